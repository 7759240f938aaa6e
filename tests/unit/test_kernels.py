"""experts/kernels: both grouped SwiGLU paths agree with the reference expert FFN.

The grid: N in {0, 1, 17, 300}, E in {1, 4, 16}, H and I in {32, 96}, fp32 and bf16, with
skewed routing (one expert takes 90% of the rows, about half the others take none), fresh
random inputs, and outputs poisoned with NaN (and NaN guard rows on both sides) so that an
unwritten row, or a row written out of bounds, fails. fp32 is held to assert_close's
defaults; bf16/fp16 to rtol = 1e-2 against a float64 reference over the same rounded
inputs, with atol = 1e-2 x max|ref|: an output that cancels to near zero is held to 1% of
the output's scale, which is what bf16 intermediates (g, u, or the activation) can give.

How the Triton kernel runs without a GPU: `TRITON_INTERPRET=1` only takes effect if it is
set before triton is first imported in the process (triton's own `tl.zeros` etc. are
decorated then). A pytest process may already have imported triton through some other
module, so the interpreter grid runs in one fresh subprocess started with the variable set;
it checks every selected case there and reports back per case, and each case is still its
own pytest test. Nothing in this pytest process changes TRITON_INTERPRET.

# N = rows, H = hidden, I = intermediate, E = local experts
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from moefleet.experts import kernels
from moefleet.experts.kernels import grouped_swiglu
from moefleet.experts.kernels.cpu import grouped_swiglu_cpu
from moefleet.experts.kernels.launch import (
    TABLE_PATH,
    LaunchConfig,
    TunedEntry,
    default_config,
    load_table,
    pick,
)
from moefleet.experts.reference import ExpertWeights, stack_experts, swiglu

_HAS_CUDA = torch.cuda.is_available()
_needs_cuda = pytest.mark.skipif(not _HAS_CUDA, reason="needs CUDA")
_needs_triton = pytest.mark.skipif(not kernels.triton_available(), reason="needs triton")


# ---- cases ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Case:
    n: int
    e: int
    h: int
    i: int
    dtype: str = "float32"
    row_weights: bool = True
    tiles: tuple[int, ...] | None = None  # LaunchConfig fields in order; None = lookup

    @property
    def id(self) -> str:
        extra = ("" if self.row_weights else "-norw") + (f"-tiles{self.tiles}" if self.tiles else "")
        return f"N{self.n}-E{self.e}-H{self.h}-I{self.i}-{self.dtype}{extra}"


_GRID = [_Case(n, e, h, i, dt) for dt in ("float32", "bfloat16") for n in (0, 1, 17, 300)
         for e in (1, 4, 16) for h in (32, 96) for i in (32, 96)]
_EXTRA = [
    _Case(17, 4, 96, 32, "float32", row_weights=False),
    _Case(300, 16, 32, 96, "bfloat16", row_weights=False),
    _Case(17, 4, 96, 96, "float16"),
    _Case(300, 4, 96, 32, "float16"),
    _Case(300, 4, 96, 96, "float32", tiles=(16, 16, 16)),  # many k-steps and column tiles
    _Case(300, 16, 96, 96, "bfloat16", tiles=(32, 64, 32, 4, 3, 3)),  # ragged L2 groups
]
_CASES = {c.id: c for c in _GRID + _EXTRA}


def _skewed_counts(n: int, e: int, gen: torch.Generator) -> torch.Tensor:
    """[E] rows per expert: one hot expert takes 90%, a random half of the rest share the
    remainder, the others get none."""
    counts = torch.zeros(e, dtype=torch.int64)
    order = torch.randperm(e, generator=gen)
    hot, takers = order[0], order[1: 1 + max((e - 1) // 2, 1)]
    counts[hot] = round(0.9 * n) if e > 1 else n
    rest = n - int(counts.sum())
    if rest:
        pick_ = takers[torch.randint(len(takers), (rest,), generator=gen)]
        counts += torch.bincount(pick_, minlength=e)
    return counts


def _make(case: _Case):
    """Fresh random inputs for a case, seeded by its id so a failure reproduces."""
    gen = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))
    dtype = getattr(torch, case.dtype)
    experts = [ExpertWeights(w1=torch.randn(case.i, case.h, generator=gen) / case.h**0.5,
                             w2=torch.randn(case.h, case.i, generator=gen) / case.i**0.5,
                             w3=torch.randn(case.i, case.h, generator=gen) / case.h**0.5)
               for _ in range(case.e)]
    w13, w2 = (w.to(dtype) for w in stack_experts(experts))  # [E, 2I, H], [E, H, I]
    x = torch.randn(case.n, case.h, generator=gen).to(dtype)  # [N, H]
    offsets = torch.zeros(case.e + 1, dtype=torch.int64)  # [E+1]
    offsets[1:] = _skewed_counts(case.n, case.e, gen).cumsum(0)
    rw = torch.rand(case.n, generator=gen) if case.row_weights else None  # [N]
    return x, w13, w2, offsets, rw


def _reference(x, w13, w2, offsets, rw) -> torch.Tensor:
    """Float64 per-expert SwiGLU from reference.py over the same (rounded) inputs -> [N, H]."""
    inter = w2.shape[2]
    x, w13, w2 = x.double(), w13.double(), w2.double()
    y = torch.zeros_like(x)
    for e, (lo, hi) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)):
        y[lo:hi] = swiglu(x[lo:hi], w13[e, :inter], w2[e], w13[e, inter:])
    return y if rw is None else y * rw.double()[:, None]


def _run_poisoned(case: _Case, backend: str, device: str = "cpu") -> None:
    """Run a case into a NaN-filled buffer with a guard row on each side; assert parity."""
    x, w13, w2, offsets, rw = (None if t is None else t.to(device) for t in _make(case))
    buf = torch.full((case.n + 2, case.h), float("nan"), dtype=x.dtype, device=device)
    out = buf[1: case.n + 1]  # [N, H], contiguous view between the guards
    if case.tiles is None:
        y = grouped_swiglu(x, w13, w2, offsets, rw, backend=backend, out=out)
    else:
        triton_mod = kernels._triton_module()
        y = triton_mod.grouped_swiglu_triton(x, w13, w2, offsets, rw, out=out,
                                             config=LaunchConfig(*case.tiles))
    assert y.data_ptr() == out.data_ptr()
    assert buf[0].isnan().all() and buf[-1].isnan().all(), "a guard row was written"
    ref = _reference(x.cpu(), w13.cpu(), w2.cpu(), offsets.cpu(), None if rw is None else rw.cpu())
    if x.dtype == torch.float32:
        torch.testing.assert_close(y.cpu(), ref.float())
    else:
        scale = ref.abs().max().item() if ref.numel() else 0.0
        torch.testing.assert_close(y.cpu().double(), ref, rtol=1e-2, atol=1e-2 * scale)


# ---- the torch path ---------------------------------------------------------------------


_TORCH_CASES = [c for c in _CASES.values() if c.tiles is None]  # tiles are Triton's


@pytest.mark.unit
@pytest.mark.parametrize("case", _TORCH_CASES, ids=[c.id for c in _TORCH_CASES])
def test_torch_path_matches_reference_and_writes_every_row(case: _Case) -> None:
    _run_poisoned(case, backend="torch")


@pytest.mark.unit
def test_torch_path_without_out_returns_a_fresh_tensor() -> None:
    x, w13, w2, offsets, rw = _make(_Case(17, 4, 32, 96))
    y = grouped_swiglu(x, w13, w2, offsets, rw, backend="torch")
    assert y.shape == x.shape and y.data_ptr() != x.data_ptr()
    torch.testing.assert_close(y, _reference(x, w13, w2, offsets, rw).float())


@pytest.mark.unit
def test_auto_backend_uses_torch_for_cpu_tensors(monkeypatch) -> None:
    def _no_triton():
        raise AssertionError("auto picked Triton for CPU tensors")

    monkeypatch.setattr(kernels, "_triton_module", _no_triton)
    x, w13, w2, offsets, rw = _make(_Case(17, 4, 32, 32))
    y = grouped_swiglu(x, w13, w2, offsets, rw)
    torch.testing.assert_close(y, grouped_swiglu_cpu(x, w13, w2, offsets, rw))


# ---- the Triton kernel under the interpreter --------------------------------------------

_WORKER = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("_kernel_parity_worker", sys.argv[1])
worker = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(worker)
print("@@RESULTS@@" + json.dumps(worker._interpreter_worker(json.loads(sys.argv[2]))))
"""


def _interpreter_worker(case_ids: list[str]) -> dict[str, str]:
    """Runs inside the TRITON_INTERPRET=1 subprocess: 'ok' or the failure, per case."""
    assert kernels._triton_module().INTERPRETED, "TRITON_INTERPRET did not take effect"
    results = {}
    for cid in case_ids:
        try:
            _run_poisoned(_CASES[cid], backend="triton")
            results[cid] = "ok"
        except Exception as exc:  # noqa: BLE001 - reported back to the parent test
            results[cid] = f"{type(exc).__name__}: {exc}"
    return results


_INTERPRETED = "test_triton_kernel_interpreted_matches_reference"
_worker: subprocess.Popen | None = None  # the interpreter worker, once started


def start_interpreter_worker(session) -> None:
    """Start one fresh TRITON_INTERPRET=1 subprocess for every selected interpreter case.
    `conftest.py` calls this as the first unit test starts, so the interpreter (the slowest
    part of the unit tests) runs on another core beside the other tests; the fixture collects
    its answer."""
    global _worker
    selected = [item.callspec.id for item in session.items
                if getattr(item, "originalname", "") == _INTERPRETED]
    if _worker is None and selected:
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        _worker = subprocess.Popen([sys.executable, "-c", _WORKER, __file__, json.dumps(selected)],
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop_interpreter_worker() -> None:
    """End the worker if the session ends before its tests ran (`-x`, a keyboard interrupt)."""
    if _worker is not None and _worker.poll() is None:
        _worker.kill()
        _worker.wait()


@pytest.fixture(scope="module")
def interpreted_results(request) -> dict[str, str]:
    """The interpreter worker's answer: 'ok' or the failure, per case."""
    start_interpreter_worker(request.session)  # if conftest.py's hook did not
    try:
        out, err = _worker.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        stop_interpreter_worker()
        pytest.fail("interpreter worker took over 600 s")
    lines = [ln for ln in out.splitlines() if ln.startswith("@@RESULTS@@")]
    if _worker.returncode or not lines:
        pytest.fail(f"interpreter worker failed (rc {_worker.returncode}):\n{err[-3000:]}")
    return json.loads(lines[-1].removeprefix("@@RESULTS@@"))


@pytest.mark.unit
@_needs_triton
@pytest.mark.parametrize("case_id", list(_CASES))
def test_triton_kernel_interpreted_matches_reference(case_id: str, interpreted_results) -> None:
    assert interpreted_results[case_id] == "ok", interpreted_results[case_id]


@pytest.mark.unit
@_needs_triton
def test_block_map_covers_each_row_once_and_never_straddles_experts() -> None:
    block_map = kernels._triton_module().block_map
    offsets = torch.tensor([0, 0, 5, 5, 40, 41, 41])  # [E+1], experts 0, 2 and 5 empty
    blk_expert, blk_row = block_map(offsets, 41, block_m=16)
    covered = []
    for e, r in zip(blk_expert.tolist(), blk_row.tolist(), strict=True):
        if e < 0:
            continue
        assert offsets[e] <= r < offsets[e + 1], "block starts outside its expert"
        covered += range(r, min(r + 16, int(offsets[e + 1])))
    assert sorted(covered) == list(range(41))
    assert blk_expert.numel() == 3 + 6 and (blk_expert < 0).sum() == 9 - 5


# ---- the Triton kernel on a GPU ---------------------------------------------------------

_GPU_CASES = [c for c in _CASES.values() if c.n in (17, 300) and c.e in (4, 16)] + [
    _Case(1000, 8, 256, 512, "bfloat16"),
    _Case(1000, 8, 256, 512, "float16"),
    _Case(4096, 64, 128, 96, "bfloat16"),
]


@pytest.mark.gpu
@_needs_cuda
@_needs_triton
@pytest.mark.parametrize("case", _GPU_CASES, ids=[c.id for c in _GPU_CASES])
def test_triton_kernel_on_cuda_matches_reference(case: _Case) -> None:
    assert kernels._resolve("auto", torch.empty(0, device="cuda")) == "triton"
    _run_poisoned(case, backend="auto", device="cuda")


# ---- the wrapper's checks ---------------------------------------------------------------


def _good():
    return _make(_Case(17, 4, 32, 32))


def _bad_inputs():
    x, w13, w2, off, rw = _good()
    yield "shapes disagree", (x[:, :16].contiguous(), w13, w2, off, rw), {}
    yield "share one dtype", (x.double(), w13, w2, off, rw), {}
    yield "share one dtype", (x, w13.half(), w2, off, rw), {}
    yield "must be contiguous", (x, w13.transpose(1, 2).contiguous().transpose(1, 2), w2, off, rw), {}
    yield "int64", (x, w13, w2, off.int(), rw), {}
    yield "\\[E\\+1\\]", (x, w13, w2, off[:-1], rw), {}
    yield "from 0 to N", (x, w13, w2, off + 1, rw), {}
    yield "non-decreasing", (x, w13, w2, torch.tensor([0, 9, 3, 17, 17]), rw), {}
    yield "row_weights", (x, w13, w2, off, rw[:-1]), {}
    yield "out must match", (x, w13, w2, off, rw), {"out": torch.empty(17, 16)}
    yield "unknown kernel backend", (x, w13, w2, off, rw), {"backend": "cuda"}


@pytest.mark.unit
@pytest.mark.parametrize("match, args, kwargs", list(_bad_inputs()))
def test_wrapper_rejects_bad_input_with_a_clear_message(match, args, kwargs) -> None:
    with pytest.raises(ValueError, match=match):
        grouped_swiglu(*args, **kwargs)


@pytest.mark.unit
@_needs_triton
def test_triton_backend_on_cpu_tensors_says_why_it_cannot_run() -> None:
    if kernels._triton_module().INTERPRETED:
        pytest.skip("this process interprets Triton, so CPU tensors are fine")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        grouped_swiglu(*_good(), backend="triton")


@pytest.mark.unit
def test_package_imports_and_runs_without_triton() -> None:
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from moefleet.experts import kernels as k\n"
        "x = torch.randn(3, 8); w13 = torch.randn(2, 8, 8); w2 = torch.randn(2, 8, 4)\n"
        "off = torch.tensor([0, 1, 3])\n"
        "assert k.grouped_swiglu(x, w13, w2, off).shape == (3, 8)\n"
        "assert not k.triton_available()\n"
        "try:\n"
        "    k.grouped_swiglu(x, w13, w2, off, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'needs the triton package' in str(e)\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


# ---- launch settings --------------------------------------------------------------------


def _entry(rows: int, block_m: int) -> TunedEntry:
    return TunedEntry("GPU-X", "bfloat16", 8, 4096, 14336, rows, LaunchConfig(block_m=block_m))


@pytest.mark.unit
def test_pick_takes_the_tuned_entry_nearest_in_rows() -> None:
    table = (_entry(32, 16), _entry(8192, 128))
    assert pick(8, 4096, 14336, "bfloat16", "GPU-X", 16, table).block_m == 16
    assert pick(8, 4096, 14336, "bfloat16", "GPU-X", 4096, table).block_m == 128


@pytest.mark.unit
def test_pick_falls_back_to_the_default_for_an_unknown_key() -> None:
    table = (_entry(32, 16),)
    assert pick(8, 4096, 14336, "float16", "GPU-X", 32, table) == default_config(32, 8)
    assert default_config(32, 8).block_m == 16 and default_config(8192, 8).block_m == 64


@pytest.mark.unit
def test_launch_table_round_trips_through_json(tmp_path: Path) -> None:
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"configs": [_entry(32, 16).to_json()]}))
    assert load_table(path) == (_entry(32, 16),)
    assert load_table(tmp_path / "missing.json") == ()
    assert isinstance(load_table(TABLE_PATH), tuple)  # the shipped table parses


@pytest.mark.unit
def test_launch_config_rejects_tiles_tl_dot_cannot_take() -> None:
    with pytest.raises(ValueError, match="power of two"):
        LaunchConfig(block_m=24)
    with pytest.raises(ValueError, match="power of two"):
        LaunchConfig(block_k=8)
