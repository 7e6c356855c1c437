"""Tensor parallel, pipeline parallel and 2 x 2 data x tensor parallel TinyGPT equal one process."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.debug import CommDebugMode

from gradwise.distributed import RankSlice, run_processes
from gradwise.distributed.mesh import average_gradients, data_tensor_mesh
from gradwise.optim import AdamW
from gradwise.problems.data import RandomWindows
from gradwise.problems.tiny_gpt import TinyGPT
from gradwise.problems.tiny_gpt_tensor_parallel import parallelize_tiny_gpt, qkv_row_order

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(120),
              pytest.mark.filterwarnings("ignore:Full backward hook is firing")]

SEQ_LEN, D_MODEL, N_LAYER, N_HEAD, BATCH, STEPS, LR, CLIP = 16, 32, 2, 4, 4, 4, 3e-3, 1.0
TEXT = torch.tensor(list(Path(textwrap.__file__).read_bytes()[:3000]), dtype=torch.uint8)


def tiny_gpt() -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT(SEQ_LEN, D_MODEL, N_LAYER, N_HEAD)


def windows(batch_size: int = BATCH) -> RandomWindows:
    return RandomWindows(TEXT, batch_size, SEQ_LEN, seed=3)


def mean_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(inputs).reshape(-1, 256), targets.reshape(-1))


def full_parameters(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Every parameter gathered whole (a collective for DTensors), qkv rows back in single-process order."""
    gathered = {}
    for name, param in model.named_parameters():
        value = param.full_tensor() if isinstance(param, DTensor) else param
        if isinstance(param, DTensor) and name.split(".")[-2] == "qkv":
            restored = torch.empty_like(value)
            restored[qkv_row_order(D_MODEL, param.device_mesh.size())] = value
            value = restored
        gathered[name] = value.detach().numpy().copy()
    return gathered


def single_process_run() -> dict:
    model, stream = tiny_gpt(), windows()
    optimizer = AdamW(model.parameters(), lr=LR)
    losses, norms = [], []
    for _ in range(STEPS):
        loss = mean_loss(model, *stream.next_batch())
        optimizer.zero_grad()
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item())
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        evaluation = mean_loss(model, *windows().next_batch()).item()
    return {"losses": losses, "norms": norms, "evaluation": evaluation,
            "parameters": {name: p.detach().numpy().copy() for name, p in model.named_parameters()}}


def assert_same_parameters(parameters: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> None:
    """Equal within 2% of one step: Adam turns round-off in a near-zero gradient into a step of up to lr
    (an element of a gradient that is zero in exact arithmetic, such as the key biases', moves by noise)."""
    assert parameters.keys() <= reference.keys()
    for name, value in parameters.items():
        np.testing.assert_allclose(value, reference[name], rtol=0, atol=0.02 * LR, err_msg=name)


def train_tensor_parallel(rank: int, world_size: int, dp: int) -> dict:
    mesh = data_tensor_mesh(dp, world_size // dp)
    model = parallelize_tiny_gpt(tiny_gpt(), mesh["tp"])
    optimizer = AdamW(model.parameters(), lr=LR)
    stream = RankSlice(windows(), mesh.get_local_rank("dp"), dp)
    losses, norms = [], []
    for _ in range(STEPS):
        loss = mean_loss(model, *stream.next_batch())
        optimizer.zero_grad()
        loss.backward()
        average_gradients(model, mesh["dp"])
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).full_tensor().item())
        optimizer.step()
        loss = loss.detach()
        dist.all_reduce(loss, group=mesh.get_group("dp"))
        losses.append(loss.item() / dp)
    return {"losses": losses, "norms": norms, "parameters": full_parameters(model),
            "all_dtensors": all(isinstance(p, DTensor) for p in model.parameters()),
            "local_qkv": tuple(model.blocks[0].attention.qkv.weight.to_local().shape)}


def count_all_reduces(rank: int, world_size: int) -> tuple[int, int]:
    """All-reduces in one forward pass of a tensor-parallel model, and in forward plus backward."""
    model = parallelize_tiny_gpt(tiny_gpt(), init_device_mesh("cpu", (world_size,)))
    counter = CommDebugMode()
    with counter:
        loss = mean_loss(model, *windows().next_batch())
        forward = counter.get_total_counts()
        loss.backward()
    return forward, counter.get_total_counts()


def train_pipeline(rank: int, world_size: int) -> list[dict]:
    """GPipe with 2 micro-batches, 1F1B with 4, and GPipe accumulating the gradients of two half batches."""
    from gradwise.problems.tiny_gpt_pipeline import TinyGPTPipeline  # not at the top: 0.7 s of CPU per 4-rank process

    runs = []
    for schedule, microbatches, accumulation in (("gpipe", 2, 1), ("1f1b", 4, 1), ("gpipe", 2, 2)):
        pipeline = TinyGPTPipeline(tiny_gpt(), world_size, microbatches, schedule)
        optimizer = AdamW(pipeline.module.parameters(), lr=LR)
        stream = windows()
        losses, norms = [], []
        for _ in range(STEPS):
            inputs, targets = stream.next_batch()
            parts = zip(inputs.chunk(accumulation), targets.chunk(accumulation), strict=True)
            losses.append(sum(pipeline.step(*part) for part in parts) / accumulation)
            for param in pipeline.module.parameters():
                param.grad /= accumulation
            norms.append(pipeline.clip_grad_norm_(CLIP))
            optimizer.step()
            optimizer.zero_grad()
        parameters = {name: p.detach().numpy().copy() for name, p in pipeline.module.named_parameters()}
        runs.append({"losses": losses, "norms": norms, "parameters": parameters,
                     "tied": pipeline.module.tied_weight().detach().numpy().copy(),
                     "evaluation": pipeline.evaluate(*windows().next_batch())})
    return runs


def bad_inputs(rank: int, world_size: int) -> list[str]:
    from gradwise.problems.tiny_gpt_pipeline import TinyGPTPipeline  # not at the top: 0.7 s of CPU per 4-rank process

    attempts = [
        lambda: parallelize_tiny_gpt(TinyGPT(SEQ_LEN, D_MODEL, 1, 1), init_device_mesh("cpu", (2,))),
        lambda: parallelize_tiny_gpt(tiny_gpt(), init_device_mesh("cpu", (1, 2))),
        lambda: data_tensor_mesh(2, 2),
        lambda: TinyGPTPipeline(tiny_gpt(), stages=1, microbatches=2),
        lambda: TinyGPTPipeline(tiny_gpt(), stages=3, microbatches=2),
        lambda: TinyGPTPipeline(TinyGPT(SEQ_LEN, D_MODEL, 3, N_HEAD), stages=2, microbatches=2),
        lambda: TinyGPTPipeline(tiny_gpt(), stages=2, microbatches=2, schedule="zero-bubble"),
        lambda: TinyGPTPipeline(tiny_gpt(), stages=2, microbatches=3).step(*windows().next_batch()),
    ]
    messages = []
    for attempt in attempts:
        try:
            attempt()
        except ValueError as error:
            messages.append(str(error))
        else:
            messages.append("no error")
    return messages


def two_rank_runs(rank: int, world_size: int) -> dict:
    """One 2-process job for the 2-rank tests (process start-up dominates their cost)."""
    return {"tp": train_tensor_parallel(rank, world_size, 1), "all_reduces": count_all_reduces(rank, world_size),
            "pp": train_pipeline(rank, world_size), "errors": bad_inputs(rank, world_size)}


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_processes(two_rank_runs, 2)


@pytest.fixture(scope="module")
def reference() -> dict:
    return single_process_run()


def assert_same_run(run: dict, reference: dict) -> None:
    np.testing.assert_allclose(run["losses"], reference["losses"], rtol=1e-5)
    np.testing.assert_allclose(run["norms"], reference["norms"], rtol=1e-4)
    assert run["all_dtensors"]  # so torch's clip_grad_norm_ returns the global norm, as checked
    assert_same_parameters(run["parameters"], reference["parameters"])


def test_tensor_parallel_over_two_ranks_equals_one_process(two_ranks, reference):
    for rank in two_ranks:
        assert_same_run(rank["tp"], reference)
        assert rank["tp"]["local_qkv"] == (3 * D_MODEL // 2, D_MODEL)  # each rank holds two of the four heads
    assert reference["losses"][-1] < reference["losses"][0]
    assert reference["norms"][0] > CLIP  # clipping acts


def test_tensor_parallel_communicates_two_all_reduces_per_block_each_way(two_ranks):
    # Megatron: the attention and the MLP each end in one all-reduce forward and start with one backward
    assert [rank["all_reduces"] for rank in two_ranks] == [(2 * N_LAYER, 4 * N_LAYER)] * 2


def test_pipeline_over_two_stages_equals_one_process_and_keeps_the_tie_exact(two_ranks, reference):
    first, last = (rank["pp"] for rank in two_ranks)
    for stage_runs in (first, last):
        for run in stage_runs:
            np.testing.assert_allclose(run["losses"], reference["losses"], rtol=1e-5)
            np.testing.assert_allclose(run["norms"], reference["norms"], rtol=1e-4)
            np.testing.assert_allclose(run["evaluation"], reference["evaluation"], rtol=1e-5)
            untied = {name: value for name, value in run["parameters"].items() if name != "output_weight"}
            assert_same_parameters(untied, reference["parameters"])
    assert {"token_embedding.weight", "blocks.0.mlp.0.weight"} <= first[0]["parameters"].keys()
    assert {"blocks.1.mlp.0.weight", "norm.weight", "output_weight"} <= last[0]["parameters"].keys()
    assert "blocks.1.mlp.0.weight" not in first[0]["parameters"]
    for first_run, last_run in zip(first, last):
        np.testing.assert_array_equal(first_run["tied"], last_run["tied"])
        np.testing.assert_allclose(first_run["tied"], reference["parameters"]["token_embedding.weight"], rtol=0,
                                   atol=0.02 * LR)


def test_data_times_tensor_parallel_on_a_two_by_two_mesh_equals_one_process_with_the_global_batch(reference):
    for run in run_processes(train_tensor_parallel, 4, 2):
        assert_same_run(run, reference)


def test_bad_input_names_the_values_on_every_rank_without_hanging(two_ranks):
    expected = [
        "n_head must be a multiple of the tensor-parallel degree, got n_head=1, tp=2",
        "tp_mesh must be one-dimensional, got a mesh of shape (1, 2)",
        "dp x tp must equal the world size, got dp=2, tp=2 for world size 2",
        "stages must be an integer >= 2, got 1",
        "stages must equal the pipeline group's world size, got stages=3 for world size 2",
        "n_layer must be a multiple of stages, got n_layer=3, stages=2",
        "schedule must be one of 'gpipe', '1f1b', 'interleaved-1f1b', got 'zero-bubble'",
        "the batch of 4 rows does not split into microbatches=3",
    ]
    assert [rank["errors"] for rank in two_ranks] == [expected, expected]



def test_muon_groups_the_stages_parameters_as_the_whole_models():
    """The last stage's copy of the tied output layer goes to Muon's AdamW, as the whole model's token
    embedding (the head it is tied to) does; orthogonalised, the two copies would part and the pipeline
    would not train as one process (it did not, before the stage declared its head)."""
    from gradwise.optim import muon_param_groups
    from gradwise.problems.tiny_gpt_pipeline import TinyGPTStage

    def grouping(model):
        names = {id(p): name for name, p in model.named_parameters()}
        return {names[id(p)]: group["use_muon"] for group in muon_param_groups(model) for p in group["params"]}

    torch.manual_seed(0)
    model = TinyGPT(seq_len=8, d_model=16, n_layer=2, n_head=2)
    whole = grouping(model)
    first, last = grouping(TinyGPTStage(model, 0, 1, True, False)), grouping(TinyGPTStage(model, 1, 2, False, True))
    assert last.pop("output_weight") is False
    assert first | last == whole
