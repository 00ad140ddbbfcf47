"""Bundle format: round trip, integrity checks and one-line errors for every kind of damage."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from ddcodec.bundle import Bundle, write_bundle
from ddcodec.bundle.manifest import derive_seed, sign_manifest
from ddcodec.errors import BundleError, DDCodecError


def run_cli(*args: str, subprocess_: bool = False) -> subprocess.CompletedProcess:
    """Run the CLI in-process (fast), or as a real process when the exit path itself is under test."""
    if subprocess_:
        return subprocess.run([sys.executable, "-m", "ddcodec.cli", *args], capture_output=True, text=True, timeout=600)
    import contextlib
    import io
    from ddcodec.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())


def assert_one_line_error(r: subprocess.CompletedProcess, needle: str) -> None:
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("ddcodec: error:"), r.stderr
    assert "Traceback" not in r.stderr
    assert needle in lines[0], lines[0]


def edit_manifest(bundle, edit, sign: bool = True) -> None:
    """Apply edit(manifest) to a bundle's manifest.json; re-sign it (as a forger would) unless sign is False."""
    m = json.loads((bundle / "manifest.json").read_text())
    edit(m)
    (bundle / "manifest.json").write_text(json.dumps(sign_manifest(m) if sign else m))


@pytest.fixture
def copy(tiny_bundle, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(tiny_bundle, dst)
    return dst


def test_round_trip_and_manifest(tiny_bundle):
    b = Bundle.open(tiny_bundle)
    m = b.manifest
    assert m["version"] == 1 and m["method"]["name"] == "random"
    assert set(m["generator"]["model"]["components"]) == {"vae", "unet", "conditioner"}
    assert all(len(h) == 64 for h in m["generator"]["model"]["components"].values())
    assert m["generator"]["scheduler"]["class"] == "DDIMScheduler"
    assert b.num_items == 40 and b.items["latents"].dtype == torch.float16
    assert b.items["class_ids"].bincount().tolist() == [4] * 10
    assert len(m["fingerprints"]["entries"]) == 4
    for info in m["payloads"].values():
        assert info["file"].endswith(".safetensors.zst") and len(info["sha256"]) == 64


def test_no_temporary_files_left(tiny_bundle):
    names = sorted(p.name for p in tiny_bundle.iterdir())
    assert names == ["items.safetensors.zst", "manifest.json", "reference.safetensors.zst"]
    assert not list(tiny_bundle.parent.glob("*.writing"))


def test_seed_derivation_is_stable():
    assert derive_seed(0, 0, 0) == derive_seed(0, 0, 0)
    assert len({derive_seed(1, i, v) for i in range(50) for v in range(4)}) == 200
    assert derive_seed(1234, 5, 6) == 6118259961024745659  # pinned: the spec in docs/format.md


def test_verify_passes_bitwise(tiny_bundle):
    r = run_cli("verify", str(tiny_bundle), subprocess_=True)
    assert r.returncode == 0 and "PASS" in r.stdout and "bitwise identical" in r.stdout, r.stdout + r.stderr


def test_truncated_payload(copy):
    f = copy / "items.safetensors.zst"
    f.write_bytes(f.read_bytes()[:-100])
    assert_one_line_error(run_cli("verify", str(copy), subprocess_=True), "truncated")


def test_flipped_byte(copy):
    f = copy / "items.safetensors.zst"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x40
    f.write_bytes(bytes(data))
    assert_one_line_error(run_cli("inspect", str(copy)), "sha256")


def test_checksum_mismatch_in_manifest(copy):
    edit_manifest(copy, lambda m: m["payloads"]["items"].update(sha256="0" * 64))
    assert_one_line_error(run_cli("verify", str(copy)), "fails its sha256 check")


def test_unknown_version(copy):
    edit_manifest(copy, lambda m: m.update(version=99), sign=False)  # checked before the checksum
    assert_one_line_error(run_cli("inspect", str(copy)), "version 99")


def test_edited_manifest_refused(copy):
    """A manifest edit that keeps it valid (here one prompt) is refused unless the manifest is re-signed."""
    edit_manifest(copy, lambda m: m["classes"]["prompts"].__setitem__(3, "a photo of a slip"), sign=False)
    assert_one_line_error(run_cli("inspect", str(copy)), "fails its manifest_sha256 check")
    edit_manifest(copy, lambda m: m.pop("manifest_sha256"), sign=False)
    assert_one_line_error(run_cli("inspect", str(copy)), "has no valid manifest_sha256")
    edit_manifest(copy, lambda m: None)
    assert run_cli("inspect", str(copy)).returncode == 0


def test_missing_file(copy):
    (copy / "reference.safetensors.zst").unlink()
    assert_one_line_error(run_cli("verify", str(copy)), "missing")


def test_missing_bundle(tmp_path):
    assert_one_line_error(run_cli("inspect", str(tmp_path / "nope")), "no bundle")


def test_garbage_manifest(copy):
    (copy / "manifest.json").write_bytes(b"\xff\xfe{not json")
    assert_one_line_error(run_cli("inspect", str(copy)), "manifest")


def test_generator_weights_differ(copy):
    edit_manifest(copy, lambda m: m["generator"]["model"]["components"].update(unet="f" * 64))
    assert_one_line_error(run_cli("verify", str(copy)), "weights differ")
    r = run_cli("verify", str(copy), "--allow-different-weights")
    assert r.returncode == 0, r.stdout + r.stderr  # weights are really the same, so images still match


def test_missing_generator(copy):
    edit_manifest(copy, lambda m: m["generator"]["model"].update(source=str(copy / "no-such-model")))
    assert_one_line_error(run_cli("verify", str(copy)), "no-such-model")


def test_encode_refuses_to_overwrite(cifar_folder, tiny_bundle):
    before = {p.name: p.read_bytes() for p in tiny_bundle.iterdir()}
    r = run_cli("encode", "--method", "random", "--data", str(cifar_folder), "--ipc", "2", "--out", str(tiny_bundle),
                "--generator", "builtin:tiny")
    assert_one_line_error(r, "already exists")
    assert {p.name: p.read_bytes() for p in tiny_bundle.iterdir()} == before


def test_bad_encode_arguments(cifar_folder, tmp_path):
    out = str(tmp_path / "x")
    assert_one_line_error(run_cli("encode", "--method", "random", "--data", str(cifar_folder), "--ipc", "99",
                                  "--out", out, "--generator", "builtin:tiny"), "larger than class")
    assert_one_line_error(run_cli("encode", "--method", "random", "--data", str(tmp_path / "none.tar"), "--ipc", "1",
                                  "--out", out, "--generator", "builtin:tiny"), "does not exist")
    assert_one_line_error(run_cli("encode", "--method", "random", "--data", str(cifar_folder), "--ipc", "1",
                                  "--out", out, "--generator", "builtin:nope"), "unknown builtin")
    assert not (tmp_path / "x").exists()


def test_write_bundle_is_atomic_on_failure(tiny_bundle, tmp_path):
    b = Bundle.open(tiny_bundle)
    m = json.loads(json.dumps(b.manifest))
    m["payloads"] = {}
    m.pop("fingerprints")
    m["generator"]["model"]["source"] = "builtin:missing"
    with pytest.raises(DDCodecError):
        write_bundle(tmp_path / "out", m, {"items": b.items})
    assert not (tmp_path / "out").exists()


def test_shard_corruption_names_the_shard(tiny_bundle, tmp_path):
    from ddcodec.bundle.shards import write_shards
    paths = write_shards(Bundle.open(tiny_bundle), tmp_path, items_per_shard=10)
    import tarfile
    with tarfile.open(paths[1]) as tar:
        member = [m for m in tar.getmembers() if m.name.endswith("item.safetensors")][2]
    data = bytearray(paths[1].read_bytes())
    data[member.offset_data + member.size - 3] ^= 0xFF  # inside an item's tensor bytes
    paths[1].write_bytes(bytes(data))
    with pytest.raises(BundleError):
        Bundle.open([str(p) for p in paths])
    with pytest.raises(BundleError, match="shard-000001"):
        Bundle.open([str(p) for p in paths[:1]] + [str(paths[1])[:-4] + "-missing.tar"])
    with pytest.raises(BundleError, match="of 40 items"):
        Bundle.open([str(p) for p in paths[:2]])


def test_inspect_and_preview(tiny_bundle, tmp_path):
    r = run_cli("inspect", str(tiny_bundle))
    assert r.returncode == 0 and "random" in r.stdout and "40 in 10 classes" in r.stdout, r.stdout + r.stderr
    r = run_cli("inspect", str(tiny_bundle), "--json")
    assert json.loads(r.stdout)["items"] == 40
    out = tmp_path / "grid.png"
    r = run_cli("preview", str(tiny_bundle), "--out", str(out), "--per-class", "3")
    assert r.returncode == 0, r.stderr
    from PIL import Image
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width > 3 * 64 and img.height >= 10 * 64


def test_shard_command_round_trip(tiny_bundle, tmp_path):
    r = run_cli("shard", str(tiny_bundle), "--out", str(tmp_path), "--items-per-shard", "16")
    assert r.returncode == 0 and "3 shard(s)" in r.stdout, r.stderr
    r = run_cli("verify", str(tmp_path / "shard-{000000..000002}.tar"))
    assert r.returncode == 0 and "bitwise identical" in r.stdout, r.stdout + r.stderr


def test_atomic_writes_honour_the_umask(tmp_path):
    """Atomically written files get the ordinary 0666 & ~umask, and the process umask is left as it was."""
    from ddcodec.bundle.atomic import atomic_write_bytes
    before = os.umask(0o027)
    try:
        atomic_write_bytes(tmp_path / "f", b"x")
        assert (tmp_path / "f").stat().st_mode & 0o777 == 0o640
        assert os.umask(0o027) == 0o027
    finally:
        os.umask(before)


def test_replace_dir_swaps_in_the_new_directory_and_leaves_no_old_one(tmp_path):
    """replace_dir installs a staged directory over an existing one or a missing one, and removes <out>.old."""
    from ddcodec.bundle.atomic import replace_dir
    out = tmp_path / "out"
    for content in (b"first", b"second"):
        staging = tmp_path / "out.writing"
        staging.mkdir()
        (staging / "f").write_bytes(content)
        replace_dir(staging, out)
        assert (out / "f").read_bytes() == content and not staging.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
