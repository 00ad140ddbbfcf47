"""The benchmark tools' own logic: the naive baseline really is the same computation, peak RSS is per child,
and the compression extrapolation reproduces the measured ratio. A few seconds in all."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_naive_class_prior_pipeline_is_bitwise_the_batched_one(capsys):
    """A class-conditional prior's naive diffusers baseline (class token as prompt_embeds, null class as the
    negative) computes exactly what the ddcodec pipeline does, guidance included."""
    r = tool("bench_regen").main(["--generator", "builtin:tiny", "--items", "3", "--latent-size", "8", "--steps", "4",
                                  "--strength", "0.5", "--guidance", "2", "--micro-batch", "1", "2", "--repeats", "1"])
    assert r["max_abs_diff_vs_naive"]["mb1"] == 0.0
    assert r["max_abs_diff_vs_naive"]["mb2"] < 1e-5
    assert set(r["speedup"]) == {"mb1", "mb2"}


def test_ld3m_bench_writes_one_row_per_T(tmp_path):
    """bench_ld3m measures each T given and records no GPU memory on CPU."""
    out = tmp_path / "ld3m.json"
    tool("bench_ld3m").main(["--generator", "builtin:tiny", "--ipc", "1", "--steps", "2", "3", "--iterations", "1",
                             "--batch-real", "4", "--json", str(out)])
    r = json.loads(out.read_text())
    assert [row["steps"] for row in r["rows"]] == [2, 3]
    assert all(row["step_s"] > 0 and row["peak_gpu_bytes"] is None for row in r["rows"])
    assert r["command"].startswith("python tools/bench_ld3m.py --generator builtin:tiny")


def test_full_size_benchmark_priors_build_where_asked():
    """Full-size random architectures are built on the requested device (meta here: shapes only, no storage)."""
    from ddcodec.generators.text import load_benchmark_prior
    prior = load_benchmark_prior("builtin:random-sdxl-turbo", device="meta")
    assert next(prior.unet.parameters()).is_meta
    assert sum(p.numel() for p in prior.unet.parameters()) == 2_567_463_684


def test_peak_rss_is_the_childs(tmp_path):
    """Measured from a small parent, as the tool runs (a parent holding torch would inflate ru_maxrss: Linux
    counts the pages a child had before its exec)."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import bench_memory as m; x = sys.executable; "
            "big = m.peak_rss([x, '-c', 'b = bytearray(300 * 2**20); b[::4096] = bytes(len(b[::4096]))'], 1); "
            "small = m.peak_rss([x, '-c', 'pass'], 1); print(json.dumps([big['peak_rss_mib'], small['peak_rss_mib']]))")
    r = subprocess.run([sys.executable, "-c", code, str(ROOT / "tools")], capture_output=True, text=True, check=True)
    big, small = json.loads(r.stdout)
    assert big >= 300 > 50 > small
    with pytest.raises(SystemExit, match="status 3"):
        tool("bench_memory").peak_rss([sys.executable, "-c", "raise SystemExit(3)"], 1, tmp_path / "log")


def test_extrapolated_ratio_matches_measured_at_measured_variants():
    comp = tool("bench_compression")
    fixed, labels, png, n, c, v = 50_000, 8_000, 500_000, 100, 10, 2
    sizes = (v, fixed, labels, png, n * c * 2)
    measured = (fixed + labels) / (png + n * v * c * 2)
    assert comp.ratio_at(v, *sizes) == pytest.approx(measured)
    assert comp.ratio_at(300, *sizes) < measured  # the fixed part is amortised
    need = comp.variants_for(0.1, *sizes)
    assert comp.ratio_at(need, *sizes) <= 0.1 < comp.ratio_at(need - 1, *sizes)
    assert comp.variants_for(0.001, *sizes) is None  # the labels alone exceed 0.1% of the pixels


def test_png_bytes_grow_with_content():
    comp = tool("bench_compression")
    flat = comp.png_bytes(torch.full((3, 32, 32), 0.5))
    noisy = comp.png_bytes(torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert 0 < flat < noisy <= 3 * 32 * 32 + 200



@pytest.mark.parametrize("extra", [[], ["--image-size", "64", "--test-split", "val", "--ld3m-steps", "4",
                                         "--ld3m-lr", "0.1", "--ld3m-optimizer", "adam", "--generator", "builtin:cifar10-v2"]])
def test_results_table_commands_parse_with_the_cli(extra):
    """Every encode/eval command the results runner builds is accepted by ddcodec's own parser, with its options."""
    from ddcodec.cli import build_parser
    rt = tool("results_table")
    a = rt.parser().parse_args(["--name", "t", "--data", "sample:cifar10", "--ipc", "1", *extra])
    cli = build_parser()
    for row in rt.ROWS:
        enc = rt.encode_args(row, a)
        if enc is not None:
            ns = cli.parse_args(["encode", *enc, "--out", "b"])
            assert ns.image_size == (64 if extra else None)
            if row in ("d4m", "dace", "ld3m-dm", "ld3m-dc"):
                assert ns.generator == ("builtin:cifar10-v2" if extra else "builtin:default")
            if row in ("ld3m-dm", "ld3m-dc"):
                assert ns.steps == (4 if extra else None)
                assert (ns.lr_z, ns.lr_c, ns.ld3m_optimizer) == ((0.1, 0.1, "adam") if extra else (None, None, None))
        ns = cli.parse_args(rt.eval_args(row, Path("b"), Path("o.json"), a))
        assert ns.test_split == ("val" if extra else "test")
        assert ns.augment == ("rrc" if row == "rded-rrc" else None)
    assert rt.encode_args("rded-rrc", a) == rt.encode_args("rded", a)  # same bundle, other augmentation


def test_results_table_lists_kept_reports(tmp_path):
    """table.md has the runner's rows in order, then any other report kept beside them, with LD3M's settings."""
    rt = tool("results_table")
    src = ROOT / "docs" / "results" / "cifar10-ipc1-convnet3"
    for name, as_name in (("ld3m-dm", "ld3m-dm-other.json"), ("random", "random.json"), ("real", "real.json")):
        shutil.copy(src / f"{name}.json", tmp_path / as_name)
    lines = [ln for ln in rt.write_table(tmp_path).splitlines() if ln.startswith("| ") and ("bundle" in ln or "pixels" in ln)]
    assert [ln.split(" | ")[0] for ln in lines] == [
        "| real pixels, random subset (seed 0)", "| random bundle (builtin:default, hard (CE))",
        "| ld3m-dm bundle (builtin:default, hard (CE), 100 iterations, SGD lr 0.01)"]
    assert (tmp_path / "table.md").read_text().count("ld3m-dm-other.json") == 1


def test_results_table_records_how_a_reused_bundle_was_made(tmp_path, monkeypatch):
    """A row that reuses a bundle (--bundles-from, or a rerun) records the command that made it, not the one
    the current options would build."""
    rt = tool("results_table")
    ran: list[list[str]] = []

    def fake_run(cmd: list[str], log: Path) -> None:
        ran.append(cmd)
        if cmd[0] == "encode":
            out = Path(cmd[cmd.index("--out") + 1])
            out.mkdir(parents=True)
            (out / "manifest.json").write_text("{}")
        else:
            Path(cmd[cmd.index("--json") + 1]).write_text(json.dumps({"mean": 0.5, "std": 0.0}))

    monkeypatch.setattr(rt, "run", fake_run)
    monkeypatch.setattr(rt, "write_table", lambda out: "")
    common = ["--data", "sample:cifar10", "--ipc", "1", "--rows", "ld3m-dm", "--work", str(tmp_path / "w"),
              "--out", str(tmp_path / "o")]
    rt.main(["--name", "a", *common, "--ld3m-optimizer", "adam"])
    first = json.loads((tmp_path / "o" / "a" / "ld3m-dm.json").read_text())["encode_command"]
    assert "--ld3m-optimizer adam" in first
    rt.main(["--name", "b", "--bundles-from", "a", *common])  # other LD3M options: the bundle is reused as made
    assert [c[0] for c in ran] == ["encode", "eval", "eval"]
    assert json.loads((tmp_path / "o" / "b" / "ld3m-dm.json").read_text())["encode_command"] == first


def test_table_rows_name_non_default_settings():
    """A row says what sets its bundle apart from the table's others: LD3M's optimiser, a patch factor other than 2,
    DACE's noise level, d4m's medoids, a d4m/dace variant count other than the tables' 5, relabelled labels."""
    method_settings = tool("eval_table").method_settings
    assert method_settings({"method": "rded", "method_params": {"factor": 1}}) == ", factor 1"
    assert method_settings({"method": "dace", "method_params": {"factor": 2}}) == ""
    assert method_settings({"method": "rded", "method_params": {"factor": 1, "candidates": 300, "patches_per_class": 10,
                                                                "crop_scale": [0.08, 1.0]}}) == ", factor 1"
    assert method_settings({"method": "rded", "method_params": {"factor": 1, "candidates": 10, "patches_per_class": 10,
                                                                "num_crops": 1, "crop_scale": [1.0, 1.0]}}) \
        == ", factor 1, no selection, whole images"
    assert method_settings({"method": "rded", "method_params": {"factor": 2, "candidates": 40, "patches_per_class": 40,
                                                                "num_crops": 5}}) == ""  # still picks 1 crop of 5
    assert method_settings({"method": "ld3m", "method_params": {"iterations": 50, "optimizer": "adam", "lr_z": 0.01}}) \
        == ", 50 iterations, Adam lr 0.01"
    assert method_settings({"method": "dace", "method_params": {"factor": 2}, "generator_params": {"rho": 0.4}}) \
        == ", rho 0.4"
    assert method_settings({"method": "dace", "method_params": {"factor": 2}, "generator_params": {"rho": 0.8}}) == ""
    assert method_settings({"method": "d4m", "method_params": {"relabelled_from": "abc"}}) == ", relabelled"
    assert method_settings({"method": "d4m", "method_params": {}, "generator_params": {"strength": 0.4}}) == ", strength 0.4"
    assert method_settings({"method": "d4m", "method_params": {}, "variants": 40}) == ", 40 variants"
    assert method_settings({"method": "d4m", "method_params": {}, "variants": 1}) == ", 1 variant"
    assert method_settings({"method": "d4m", "method_params": {"prototype": "medoid"}}) == ", medoids"
    assert method_settings({"method": "d4m", "method_params": {"prototype": "centroid"}}) == ""
    assert method_settings({"method": "dace", "method_params": {}, "variants": 5}) == ""
    assert method_settings({"method": "ld3m", "method_params": {"iterations": 50, "optimizer": "adam", "lr_z": 0.01},
                            "variants": 1}) == ", 50 iterations, Adam lr 0.01"
    t = tool("eval_table")
    default = {"optimizer": "sgd", "lr": 0.01, "weight_decay": 5e-4, "batch_size": 64, "temperature": None,
               "augment": "crop", "mix": "none"}
    assert t.recipe(default) == "" and t.augmentation(default) == "crop"
    assert t.recipe(default | {"optimizer": "adamw", "lr": 0.001, "weight_decay": 0.01, "temperature": 4.0}) \
        == ", AdamW lr 0.001, wd 0.01, T 4"
    assert t.recipe(default | {"batch_size": 32}) == ", batch 32"
    assert t.augmentation(default | {"augment": "rrc", "mix": "cutmix"}) == "rrc+cutmix"
    assert t.augmentation({"augment": "rrc"}) == "rrc"  # reports from before --mix


def test_label_agreement_counts_the_teacher_top1_against_the_classes(noisy_bundle):
    """A teacher that always says class 0 agrees with exactly the class-0 items, in every variant."""
    from ddcodec.bundle import Bundle

    class Always0(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.tensor([4.0] + [0.0] * 9))

        def forward(self, x):
            return self.bias.expand(len(x), -1)

    b = Bundle.open(noisy_bundle)
    r = tool("label_agreement").agreement(b, Always0())
    share0 = float((b.items["class_ids"] == 0).float().mean())
    assert r["variants"] == 3 and r["teacher_top1_is_class"] == pytest.approx(share0)
    p0 = torch.tensor([4.0] + [0.0] * 9).softmax(-1)
    expected = share0 * float(p0[0]) + (1 - share0) * float(p0[1])
    assert r["teacher_prob_of_class"] == pytest.approx(expected, rel=1e-5) and "stored_top1_is_class" not in r
