# The two commands a newcomer types (see README.md):
#   make race   - set up the environment (once) and run the optimizer race on its defaults
#   make test   - set up the environment (once), run the static checks and the test suite
# and, for maintainers: make measure (timed model checks), make bench (step throughput),
# make race-tiny-gpt (the time-to-target races of the README)
# The environment is rebuilt only when pyproject.toml or constraints.txt change.

PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed

.PHONY: race race-tiny-gpt test measure bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet -c constraints.txt -e '.[test,bench]'
	touch $(STAMP)

race: $(STAMP)
	$(VENV)/bin/gradwise race

# The README's time-to-target races on tiny-gpt (benchmarks/results/race_tiny_gpt_*; about three hours
# here; the committed frontier results ran as two races that shared AdamW's and Muon's runs, which
# do not depend on the other racers). Interrupted, the same command continues where it stopped: --resume.
RACE_GPT := $(VENV)/bin/gradwise race --workload tiny-gpt --workload-options n_layer=2 --trials 3 --seeds 3
race-tiny-gpt: $(STAMP)
	$(RACE_GPT) --optimizers adamw,muon,soap,shampoo,lion,adafactor,sophia,kfac --steps 400 \
		--out race-results/tiny-gpt-400 $(if $(wildcard race-results/tiny-gpt-400),--resume)
	$(RACE_GPT) --optimizers adamw,muon,soap,shampoo --steps 200 \
		--out race-results/tiny-gpt-200 $(if $(wildcard race-results/tiny-gpt-200),--resume)
	$(RACE_GPT) --optimizers adamw,muon,normuon,schedule-free-adamw,ademamix,mars-adamw,adamw-cautious,psgd-kron \
		--steps 400 --out race-results/tiny-gpt-400-frontier \
		$(if $(wildcard race-results/tiny-gpt-400-frontier),--resume)

# The static checks first (seconds): ruff's lint and mypy's types (configured in pyproject.toml).
test: $(STAMP)
	$(VENV)/bin/ruff check gradwise tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/python -m pytest -n 2 -q -m "not measurement"

# Timed checks of the models against this machine (marked "measurement"), run alone so that
# no other test competes for the cores; not part of `make test`, whose result must not
# depend on how busy a shared machine is.
measure: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m measurement

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/step_throughput.py

clean:
	rm -rf $(VENV) race-results
