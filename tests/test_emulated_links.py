"""benchmarks/emulated_links.py without root or timing: the namespace and worker commands, the
teardown after a failure, and the fit and predictions on synthetic timings. The real namespaces
are built only by the ``measurement`` test at the end (root, ``ip``), outside ``make test``."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gradwise.plan.communication import AlphaBeta, collective_time
from gradwise.plan.parallel_step_time import layer_flops, logit_flops, parallel_step_time
from gradwise.plan.parallelism import Layout, Transformer
from gradwise.plan.step_time import data_parallel_step_time
from gradwise.problems.tiny_gpt import TinyGPT

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "emulated_links.py"
_spec = importlib.util.spec_from_file_location("emulated_links", SCRIPT)
assert _spec is not None and _spec.loader is not None
links = importlib.util.module_from_spec(_spec)
sys.modules["emulated_links"] = links  # dataclasses look their module up there
_spec.loader.exec_module(links)


def added_namespaces(commands):
    return [c[3] for c in commands if c[:3] == ["ip", "netns", "add"]]


def test_names_are_unique_per_run_and_fit_the_kernels_limit():
    first, second = links.new_topology(4), links.new_topology(4)
    assert first.token != second.token
    big = links.Topology("abcdef", 64)
    for rank in (0, 63):
        assert len(big.device(rank)) <= 15 and len(big.bridge_port(rank)) <= 15  # IFNAMSIZ - 1
    names = [first.bridge_namespace, *(first.namespace(r) for r in range(4))]
    assert len(set(names)) == 5 and all(first.token in name for name in names)
    assert not set(names) & {second.bridge_namespace, *(second.namespace(r) for r in range(4))}


def test_setup_builds_a_bridge_a_namespace_per_host_and_a_limit_on_each_egress():
    topology = links.Topology("0a1b2c", 3)
    commands = links.setup_commands(topology, rate_mbit=100, burst_bytes=4096)
    assert added_namespaces(commands) == [topology.bridge_namespace] + [topology.namespace(r) for r in range(3)]
    for rank in range(3):
        host, device = topology.namespace(rank), topology.device(rank)
        # the veth's ends are made inside their namespaces, the bridge's end joins br0
        assert ["ip", "link", "add", device, "netns", host, "type", "veth", "peer", "name",
                topology.bridge_port(rank), "netns", topology.bridge_namespace] in commands
        assert ["ip", "-n", topology.bridge_namespace, "link", "set", topology.bridge_port(rank), "master",
                "br0"] in commands
        assert ["ip", "-n", host, "addr", "add", f"10.218.0.{rank + 1}/24", "dev", device] in commands
        limit = [c for c in commands if c[:2] == ["tc", "-n"] and c[2] == host]
        assert limit == [["tc", "-n", host, "qdisc", "add", "dev", device, "root", "tbf", "rate", "100mbit",
                          "burst", "4096", "latency", "100ms"]]
        # a host's commands come after its namespace exists
        assert commands.index(["ip", "netns", "add", host]) < commands.index(limit[0])
    assert not [c for c in links.setup_commands(topology, rate_mbit=None) if c[0] == "tc"]


def test_teardown_deletes_every_namespace_setup_adds():
    topology = links.Topology("0a1b2c", 4)
    deleted = [c[3] for c in links.teardown_commands(topology)]
    assert sorted(deleted) == sorted(added_namespaces(links.setup_commands(topology, 100)))


class Recorder:
    """A runner that records (command, check) and raises at the command numbered ``fail_at``."""

    def __init__(self, fail_at=None):
        self.calls, self.fail_at = [], fail_at

    def __call__(self, command, check=True):
        self.calls.append((command, check))
        if len(self.calls) == self.fail_at:
            raise subprocess.CalledProcessError(1, command)


@pytest.mark.parametrize("fail_at", [1, 6, 12])
def test_a_failed_setup_command_still_tears_everything_down(fail_at):
    topology, run = links.Topology("0a1b2c", 2), Recorder(fail_at)
    with pytest.raises(subprocess.CalledProcessError), links.emulated_links(topology, 100, run=run):
        pytest.fail("the block must not run after a failed setup")
    teardown = links.teardown_commands(topology)
    assert run.calls[fail_at:] == [(command, False) for command in teardown]


@pytest.mark.parametrize("error", [RuntimeError("worker died"), KeyboardInterrupt()])
def test_a_failure_inside_the_block_tears_everything_down(error):
    topology, run = links.Topology("0a1b2c", 2), Recorder()
    with pytest.raises(type(error)), links.emulated_links(topology, 100, run=run):
        raise error
    setup, teardown = links.setup_commands(topology, 100), links.teardown_commands(topology)
    assert run.calls == [(c, True) for c in setup] + [(c, False) for c in teardown]


def test_sigterm_unwinds_through_the_teardown():
    with pytest.raises(SystemExit) as stop:
        links._exit_on_sigterm(15, None)
    assert stop.value.code == 143


def test_each_worker_runs_in_its_namespace_on_its_veth():
    topology = links.Topology("0a1b2c", 4)
    command = links.worker_command(topology, 2, ["collectives", "--repeats", "3"])
    assert command[:4] == ["ip", "netns", "exec", topology.namespace(2)]
    assert command[4:] == [sys.executable, "-m", "benchmarks.emulated_links", "worker", "collectives", "--repeats", "3"]
    env = links.worker_env(topology, 2, 3)
    assert env["GLOO_SOCKET_IFNAME"] == topology.device(2)
    assert env["MASTER_ADDR"] == topology.address(0) == "10.218.0.1"
    assert (env["RANK"], env["WORLD_SIZE"]) == ("2", "3")


def test_launch_kills_the_other_workers_when_one_fails(monkeypatch, tmp_path):
    """Rank 0 exits with an error; rank 1 would sleep a minute: launch raises at once and kills it."""
    pid_file = tmp_path / "sleeper.pid"
    partial = str(pid_file) + ".tmp"  # renamed when written whole
    sleeper = (f"import os, time; open({partial!r}, 'w').write(str(os.getpid())); "
               f"os.rename({partial!r}, {str(pid_file)!r}); time.sleep(60)")
    failer = f"import os, sys, time\nwhile not os.path.exists({str(pid_file)!r}): time.sleep(0.01)\nsys.exit(3)"

    def fake_command(topology, rank, task_args):
        return [sys.executable, "-c", failer if rank == 0 else sleeper]

    monkeypatch.setattr(links, "worker_command", fake_command)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="exited with 3"):
        links.launch(links.Topology("0a1b2c", 2), 2, ["ddp"], timeout_s=30)
    assert time.monotonic() - started < 20
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def synthetic_rows(truth: dict[str, AlphaBeta], median_over_fastest: float = 1.5):
    rows = []
    for c in truth:
        for p in (2, 3, 4):
            for n in links.SIZES:
                fastest = collective_time(truth[c], links.ALGORITHM[c], n, p)
                rows.append({"collective": c, "processes": p, "message_bytes": n, "fastest_s": fastest,
                             "median_s": median_over_fastest * fastest, "repeats": 1})
    return rows


def test_the_fit_at_two_processes_recovers_alpha_and_beta_and_predicts_the_rest():
    truth = {"all_reduce": AlphaBeta(3e-4, 8.4e-8), "reduce_scatter": AlphaBeta(1e-3, 1.6e-7),
             "all_gather": AlphaBeta(5e-4, 1.2e-7)}
    rows = synthetic_rows(truth)
    fitted = links.fit_links(rows)  # on the fastest calls
    for collective, link in truth.items():
        assert fitted[collective].alpha == pytest.approx(link.alpha, rel=1e-6)
        assert fitted[collective].beta == pytest.approx(link.beta, rel=1e-6)
    on_medians = links.fit_links(rows, "median_s")
    assert on_medians["all_reduce"].beta == pytest.approx(1.5 * truth["all_reduce"].beta, rel=1e-6)
    predicted = links.predict(rows, fitted)
    assert sum(r["in_fit"] for r in predicted) == 3 * len(links.FIT_SIZES)
    assert max(abs(r["error"]) for r in predicted) < 1e-6
    summary = links.summarise(predicted)
    assert [(s["collective"], s["processes"]) for s in summary] == [
        (c, p) for c in sorted(truth) for p in (2, 3, 4)]
    held_out = len(links.SIZES) - len(links.FIT_SIZES)
    assert [s["held_out"] for s in summary] == [held_out, len(links.SIZES), len(links.SIZES)] * 3


def test_the_error_is_model_over_measured_minus_one():
    rows = synthetic_rows({"all_reduce": AlphaBeta(1e-4, 1e-8), "reduce_scatter": AlphaBeta(1e-4, 1e-8),
                           "all_gather": AlphaBeta(1e-4, 1e-8)})
    slow = [{**r, "fastest_s": 2 * r["fastest_s"]} if r["processes"] == 4 else r for r in rows]
    predicted = links.predict(slow, links.fit_links(slow))
    assert {round(r["error"], 9) for r in predicted if r["processes"] == 4} == {-0.5}
    assert next(s for s in links.summarise(predicted) if s["processes"] == 4)["within_target"] == 0


def test_the_step_prediction_uses_the_one_process_step_as_compute():
    link, params, batch = AlphaBeta(1e-3, 8e-8), 1_239_040, 2
    unlimited = {p: {"fastest_s": t, "gradient_bytes": 4 * params} for p, t in {1: 0.1, 2: 0.15, 4: 0.3}.items()}
    limited = {p: {"fastest_s": t} for p, t in {2: 0.5, 4: 0.9}.items()}
    rows = links.predict_steps(limited, unlimited, batch, link)
    assert [r["processes"] for r in rows] == [2, 4]
    throughput = 6 * params * batch * links.SEQ_LEN / 0.1
    for row in rows:
        p = row["processes"]
        model = data_parallel_step_time(params, p * batch * links.SEQ_LEN, p, throughput, link, 4.0)
        assert row["predicted_compute_s"] == pytest.approx(0.1)
        assert row["predicted_s"] == pytest.approx(model.total)
        assert row["error"] == pytest.approx(model.total / limited[p]["fastest_s"] - 1)
        # the link's share: the limited step less the unlimited one, against the model's communication
        assert row["communication_error"] == pytest.approx(
            model.communication / (limited[p]["fastest_s"] - unlimited[p]["fastest_s"]) - 1)


def test_the_planner_sees_tiny_gpt_as_built():
    model = TinyGPT(seq_len=16, d_model=32, n_layer=2, n_head=4)
    shape = links.tiny_gpt_shape(model)
    assert shape == Transformer(layers=2, width=32, heads=4, vocab=256, seq_len=16)
    assert shape.parameter_count() == sum(p.numel() for p in model.parameters())


FITS = {"all_reduce": AlphaBeta(1e-4, 8e-8), "reduce_scatter": AlphaBeta(8e-4, 1.6e-7),
        "all_gather": AlphaBeta(5e-4, 1e-7)}
GPT = Transformer(layers=6, width=128, heads=4, vocab=256, seq_len=128)


def test_the_3d_prediction_uses_the_one_process_step_as_compute_and_calibrates_the_overhead_unlimited():
    one_process = {"fastest_s": 0.2, "median_s": 0.25}
    limited = [{"pp": 2, "dp": 1, "tp": 2, "fastest_s": 1.5, "median_s": 1.6},
               {"pp": 2, "dp": 2, "tp": 1, "fastest_s": 1.4, "median_s": 1.5}]
    unlimited = [{"fastest_s": 0.5, "median_s": 0.6}, {"fastest_s": 0.3, "median_s": 0.4}]
    rows = links.predict_3d_steps(limited, unlimited, one_process, GPT, 8, 4, FITS)
    assert [row["shape"] for row in rows] == ["2x1x2", "2x2x1"]
    # the planner's compute at one device, on the whole batch, is the one-process step
    flops = GPT.layers * layer_flops(GPT, 8) + logit_flops(GPT, 8)
    one_device = parallel_step_time(GPT, Layout(), 8 * 128, flops / 0.2, FITS["all_reduce"], "fp32")
    assert one_device.compute == pytest.approx(0.2)
    own = {"all-reduce": FITS["all_reduce"], "reduce-scatter": FITS["reduce_scatter"],
           "all-gather": FITS["all_gather"]}
    for row, measured, fast in zip(rows, limited, unlimited):
        layout = Layout(pp=2, dp=row["dp"], tp=row["tp"], microbatches=4)
        bare = parallel_step_time(GPT, layout, 8 * 128, flops / 0.2, FITS["all_reduce"], "fp32", zero_stage=3,
                                  collective_links=own)
        # on unlimited links the model's 4 + 1 slots of compute and overhead are the unlimited step
        assert (bare.compute / 4 + row["overhead_s"]) * (4 + 1) == pytest.approx(fast["fastest_s"])
        step = parallel_step_time(GPT, layout, 8 * 128, flops / 0.2, FITS["all_reduce"], "fp32", zero_stage=3,
                                  collective_links=own, overhead=row["overhead_s"])
        assert row["predicted_s"] == pytest.approx(step.total) == pytest.approx(sum(row["parts_s"].values()))
        assert row["predicted_s"] == pytest.approx(bare.total + (4 + 1) * row["overhead_s"])
        assert row["predicted_bare_s"] == pytest.approx(bare.total)
        assert row["micro_batch"] == 8 // (row["dp"] * 4)
        assert row["error"] == pytest.approx(step.total / measured["fastest_s"] - 1)
        assert row["parts_s"][row["largest_part"]] == max(row["parts_s"].values())
        # with links infinitely fast the step is compute over m micro-batches and the p - 1 of the bubble
        assert row["predicted_link_s"] == pytest.approx(bare.total - bare.compute * (4 + 1) / 4)
        assert row["link_error"] == pytest.approx(
            row["predicted_link_s"] / (measured["fastest_s"] - fast["fastest_s"]) - 1)
    # the data-parallel mesh's reduce-scatters on their own, slower fit
    one_link = parallel_step_time(GPT, Layout(pp=2, dp=2, microbatches=4), 8 * 128, flops / 0.2, FITS["all_reduce"],
                                  "fp32", zero_stage=3)
    assert rows[1]["predicted_bare_s"] > one_link.total
    medians = links.predict_3d_steps(limited, unlimited, one_process, GPT, 8, 4, FITS, "median_s")
    assert [row["measured_s"] for row in medians] == [1.6, 1.5]
    assert medians[0]["parts_s"]["compute"] == pytest.approx(rows[0]["parts_s"]["compute"] * 0.25 / 0.2)


def test_an_unlimited_step_faster_than_the_compute_calibrates_no_overhead():
    rows = links.predict_3d_steps([{"pp": 2, "dp": 2, "tp": 1, "fastest_s": 1.0}], [{"fastest_s": 0.01}],
                                  {"fastest_s": 0.2}, GPT, 8, 4, FITS)
    assert rows[0]["overhead_s"] == 0.0 and rows[0]["predicted_s"] == rows[0]["predicted_bare_s"]


@pytest.mark.measurement
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None,
                    reason="needs root, ip and tc")
def test_real_namespaces_are_built_and_removed():
    topology = links.new_topology(2)
    with links.emulated_links(topology, 100):
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
        assert topology.namespace(1) in listed and topology.bridge_namespace in listed
        qdisc = subprocess.run(["tc", "-n", topology.namespace(1), "qdisc", "show", "dev", topology.device(1)],
                               capture_output=True, text=True, check=True).stdout
        assert "tbf" in qdisc and "100Mbit" in qdisc
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert topology.token not in listed
