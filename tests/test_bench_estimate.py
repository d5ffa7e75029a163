"""scripts/bench_estimate.py's grids: grouped KV heads and nanochat's block have rows on the CPU
grid and at GPT-2's size on the CUDA grid (so `--device cuda` measures the GQA CUDA memory term on
the next GPU run), and the CPU path measures the grouped rows, selected with --match."""
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import bench_estimate  # noqa: E402

NANOCHAT = {"pos_emb": "rope", "norm": "rmsnorm", "qk_norm": True, "mlp": "relu2", "optimizer": "muon"}


def grouped(c) -> bool:
    return c.n_kv_head is not None and c.n_kv_head < c.n_head


def nanochat(c) -> bool:
    return all(getattr(c, k) == v for k, v in NANOCHAT.items())


def test_both_grids_have_grouped_nanochat_and_grouped_nanochat_rows():
    for grid in (bench_estimate.GRID, bench_estimate.CUDA_GRID):
        assert any(grouped(c) and not nanochat(c) for c in grid)
        assert any(nanochat(c) and not grouped(c) for c in grid)
        assert any(nanochat(c) and grouped(c) for c in grid)
    at_size = [c for c in bench_estimate.CUDA_GRID if c.block_size >= 1024]  # what --only-gpu-sized keeps
    assert any(grouped(c) and not nanochat(c) and c.dtype == "bfloat16" for c in at_size)
    assert any(nanochat(c) and not grouped(c) for c in at_size)
    for c in at_size:
        if grouped(c) and c.pos_emb == "rope":
            # with RoPE the estimate's grouped term is C - 3 kvd per token and block: 0 would tell nothing
            assert c.n_embd - 3 * c.n_kv_head * (c.n_embd // c.n_head) > 0


def test_the_cpu_path_measures_the_grouped_rows_within_the_estimate(capsys):
    assert bench_estimate.main(["--json", "--match", "n_kv_head"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = out["rows"]
    assert rows and all("error" not in r for r in rows)
    assert [r["config"] for r in rows] == [c.label() for c in bench_estimate.GRID if grouped(c)]
    assert any(r["pos_emb"] == "rope" and r["qk_norm"] for r in rows) and any(r["dtype"] == "bfloat16" for r in rows)
    # the CPU estimate of grouped heads is exact per tensor (tests/test_estimate_gqa.py): whole rows within 0.5 %
    assert out["max_abs_rel_error"] < 0.005, rows


def test_a_match_that_selects_no_row_is_one_line_and_exit_2(capsys):
    assert bench_estimate.main(["--match", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "no row's label holds any of ['nosuch']" in err
