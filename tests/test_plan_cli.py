"""``gradwise plan ...``: tables, JSON, plots, and bad input (one line, exit code 2)."""

from __future__ import annotations

import json

import pytest

from gradwise.cli import main


def exit_code(arguments: list[str]) -> int:
    """``main``'s return value, or the code of the ``SystemExit`` that argparse raises."""
    try:
        return main(arguments)
    except SystemExit as exit:
        return exit.code


def run_json(capsys, *arguments):
    assert main(["plan", *arguments, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_memory_json_and_plot(tmp_path, capsys):
    data = run_json(capsys, "memory", "--params", "7e9", "--optimizer", "adamw", "--precision", "bf16",
                    "--zero", "3", "--devices", "8", "--out", str(tmp_path))
    assert data["per_device"]["total"] == pytest.approx(84e9 / 8, rel=1e-6)
    assert [row["bytes"]["total"] for row in data["by_stage"]][0] == pytest.approx(84e9, rel=1e-6)
    assert (tmp_path / "memory.svg").read_text(encoding="utf-8").startswith('<?xml version="1.0"')


def test_memory_table_with_transformer_activations(tmp_path, capsys):
    code = main(["plan", "memory", "--layers", "12", "--width", "768", "--vocab", "50257", "--seq-len", "1024",
                 "--micro-batch", "8", "--precision", "mixed", "--optimizer", "adam", "--no-plot"])
    assert code == 0
    out = capsys.readouterr().out
    assert "1.244e+08 parameters" in out and "* DP" in out  # GPT-2 small, its 1024 position embeddings counted
    assert "activations not included" not in out


TINY = ["--layers", "4", "--width", "32", "--heads", "4", "--vocab", "256", "--seq-len", "16"]


def test_memory_of_a_3d_layout_is_the_largest_stages_device(tmp_path, capsys):
    from gradwise.plan.parallelism import Layout, Transformer, stage_memory

    data = run_json(capsys, "memory", *TINY, "--tp", "2", "--pp", "2", "--microbatches", "4", "--devices", "3",
                    "--zero", "3", "--precision", "fp32", "--micro-batch", "2", "--out", str(tmp_path))
    layout = Layout(pp=2, dp=3, tp=2, microbatches=4)
    expected = [stage_memory(Transformer(4, 32, 4, 256, 16), layout, stage, "adamw", "fp32", 3, micro_batch=2)
                for stage in (0, 1)]
    assert data["devices"] == 12 and data["layout"]["dp"] == 3
    assert data["stages"] == [estimate.as_dict() for estimate in expected]
    assert data["largest_stage"] == 0 and data["per_device"] == expected[0].as_dict()
    assert data["activations"]["layers_in_flight"] == [4, 2]  # 1f1b: 2 layers x min(p - i, m) micro-batches
    assert (tmp_path / "memory.svg").exists()
    assert main(["plan", "memory", *TINY, "--pp", "2", "--schedule", "gpipe", "--sequence-parallel", "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "pp 2 x dp 1 x tp 1 = 2 devices, gpipe" in out and "pp stage" in out and "sbh(34 + 5as/h)/t" in out


def test_step_of_a_3d_layout_breaks_the_step_down(tmp_path, capsys):
    data = run_json(capsys, "step", *TINY, "--tp", "2", "--pp", "2", "--microbatches", "4", "--devices", "8",
                    "--tokens", str(16 * 4 * 8 * 3), "--zero", "3", "--out", str(tmp_path))
    assert [row["dp"] for row in data["by_devices"]] == [1, 2, 4, 8]  # each splits 96 sequences into 4 micro-batches
    assert data["micro_batch"] == 3 and data["bubble_fraction"] == pytest.approx(1 / 5)
    final = {row["precision"]: row for row in data["by_devices"][-1]["formats"]}["fp8"]
    parts = ("compute_s", "bubble_s", "tensor_s", "pipeline_s", "data_s", "tied_s", "overhead_s")
    assert final["step_s"] == pytest.approx(sum(final[part] for part in parts)) and final["overhead_s"] == 0
    slower = run_json(capsys, "step", *TINY, "--tp", "2", "--pp", "2", "--microbatches", "4", "--devices", "8",
                      "--tokens", str(16 * 4 * 8 * 3), "--zero", "3", "--overhead", "0.001", "--no-plot")
    with_overhead = {row["precision"]: row for row in slower["by_devices"][-1]["formats"]}["fp8"]
    assert with_overhead["step_s"] - final["step_s"] == pytest.approx((4 + 2 - 1) * 0.001)  # every slot's
    assert {(e["dimension"], e["collective"]) for e in data["traffic"]} == {
        ("tensor", "all-reduce"), ("pipeline", "send/recv"), ("data", "all-gather"), ("data", "reduce-scatter"),
        ("tied", "all-reduce")}
    assert (tmp_path / "step_time.png").exists()
    assert main(["plan", "step", *TINY, "--pp", "2", "--microbatches", "2", "--devices", "2", "--tokens", "64",
                 "--no-plot"]) == 0
    assert "the bubble (p-1)/(vm+p-1) is 33.3%" in capsys.readouterr().out


def test_step_shows_where_latency_dominates(tmp_path, capsys):
    data = run_json(capsys, "step", "--params", "1.2e7", "--devices", "4096", "--tokens", "2.6e5",
                    "--out", str(tmp_path))
    rows = {row["devices"]: {f["precision"]: f for f in row["formats"]} for row in data["by_devices"]}
    assert rows[1]["bf16"]["step_s"] / rows[1]["fp8"]["step_s"] == pytest.approx(2.0)
    assert rows[4096]["bf16"]["step_s"] / rows[4096]["fp8"]["step_s"] < 1.05
    assert data["latency_dominates_from_devices"] == 128
    assert set(data["time_to_solution"]) == {"fp32", "bf16", "fp8"}
    assert (tmp_path / "step_time.png").exists()


def test_batch_json(capsys):
    data = run_json(capsys, "batch", "--workload", "mlp", "--eps", "0.3", "--delta", "0.1", "--examples", "256",
                    "--samples", "500")
    assert data["sampled"]["fraction_within_eps"] >= 0.9
    assert data["batch_size"] == pytest.approx(data["noise_scale"] / (0.3**2 * 0.1), abs=1)


def test_stability_table_and_plot(tmp_path, capsys):
    code = main(["plan", "stability", "--tau", "2", "--max-tau", "3", "--curvature", "10", "--kappa", "100",
                 "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "* 2" in out and "0.618034" in out and "0.980198" in out
    assert (tmp_path / "stability.png").exists()
    data = run_json(capsys, "stability", "--tau", "1", "--no-simulation", "--no-plot")
    assert data["critical_step"] == pytest.approx(1.0)


def test_network_and_failures(tmp_path, capsys):
    topology = tmp_path / "net.json"
    topology.write_text(json.dumps({"links": [
        {"from": "storage", "to": "w1", "latency": 1, "bandwidth": 4},
        {"from": "storage", "to": "w2", "latency": 2, "bandwidth": 6},
        {"from": "w1", "to": "w2", "latency": 1, "bandwidth": 1}], "source": "storage", "sinks": ["w1", "w2"]}))
    data = run_json(capsys, "network", str(topology))
    assert data["max_flow"]["value"] == 10 and data["spanning_tree"]["total"] == 2
    jobs = tmp_path / "jobs.csv"
    jobs.write_text("hardware,outcome\n" + "a,ok\n" * 40 + "a,oom\n" * 2 + "b,ok\n" * 20 + "b,oom\n" * 20)
    data = run_json(capsys, "failures", str(jobs))
    assert data["p_value"] < 1e-4 and data["driving_cells"][0]["hardware"] in ("a", "b")
    assert main(["plan", "failures", str(jobs)]) == 0
    assert "chi-squared" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        (["memory", "--params", "-1"], "params"),
        (["memory", "--params", "7e9", "--optimizer", "adamq"], "optimizer"),
        (["memory", "--params", "7e9", "--precision", "fp4"], "precision"),
        (["memory", "--params", "7e9", "--devices", "0"], "devices"),
        (["memory", "--params", "7e9", "--zero", "5"], "zero"),
        (["step", "--params", "0"], "params"),
        (["step", "--params", "1e9", "--bandwidth", "-1"], "bandwidth"),
        (["step", "--params", "1e9", "--throughput", "fast"], "--throughput"),
        (["batch", "--workload", "resnet"], "workload"),
        (["batch", "--delta", "1.5"], "delta"),
        (["stability", "--tau", "-2"], "tau"),
        (["network", "missing.json"], "topology"),
        (["failures", "missing.csv"], "jobs"),
        (["memory", "--params", "lots"], "--params"),
        (["memory", *TINY, "--tp", "3"], "tp"),
        (["memory", *TINY, "--pp", "3"], "pp"),
        (["memory", *TINY, "--microbatches", "0"], "microbatches"),
        (["memory", *TINY, "--pp", "2", "--schedule", "interleaved-1f1b", "--microbatches", "3"], "microbatches"),
        (["memory", *TINY, "--virtual-stages", "2"], "virtual_stages"),
        (["memory", *TINY, "--schedule", "zb"], "schedule"),
        (["memory", "--layers", "4", "--width", "32", "--tp", "2"], "--seq-len"),
        (["memory", "--params", "1e9", "--pp", "2"], "--params"),
        (["step", *TINY, "--pp", "2", "--microbatches", "4", "--devices", "2", "--tokens", "100"], "micro-batches"),
        (["step", "--layers", "4", "--tp", "2"], "--width"),
        (["step", *TINY, "--tp-bandwidth", "0"], "tp-bandwidth"),
        (["step", *TINY, "--overhead", "-1"], "overhead"),
        (["step"], "--params"),
    ],
)
def test_bad_input_is_one_line_naming_the_field_and_exit_2(capsys, arguments, field):
    assert exit_code(["plan", *arguments]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and field in err


def test_malformed_topology_is_exit_2(tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"links": [{"from": "a", "to": "b", "bandwidth": "wide"}], "source": "a"}))
    assert main(["plan", "network", str(path)]) == 2
    assert "topology.links[0].bandwidth must be a number" in capsys.readouterr().err

