"""Run one results table end to end: encode every method's bundle, evaluate each row, write the JSONs and the table.

Every row is a `ddcodec encode` plus a `ddcodec eval` (or `ddcodec eval-real`) command, run as a subprocess and
printed; a row whose JSON exists is skipped, so an interrupted table resumes (the encodes resume too).

    python tools/results_table.py --name cifar10-ipc10-convnet3 --data ../shared/datasets/cifar10.tar --ipc 10 \\
        --student convnet3 --epochs 100 --seeds 3 --test-limit 2000 --threads 2
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROWS = ("real", "random", "rded", "rded-rrc", "dace", "d4m", "ld3m-dm", "ld3m-dc", "full")
# rded-rrc evaluates the rded bundle with random-resized crops of the collages, as RDED trains on CIFAR
BUNDLE_OF = {"rded-rrc": "rded"}


def size_args(a: argparse.Namespace) -> list[str]:
    """`--image-size N` when the table resizes the data, else nothing."""
    return ["--image-size", str(a.image_size)] if a.image_size else []


def encode_args(row: str, a: argparse.Namespace) -> list[str] | None:
    """The `ddcodec encode` arguments of a row (None for real-pixel rows)."""
    common = ["--data", a.data, "--ipc", str(a.ipc), "--seed", "0", *size_args(a)]
    teacher = ["--teacher", a.teacher]
    pick = ["--candidates", str(a.candidates)] if a.candidates else []
    prior = ["--generator", a.generator] if a.generator else []
    row = BUNDLE_OF.get(row, row)
    ld3m = ["--iterations", str(a.ld3m_iterations), "--batch-real", str(a.batch_real), "--candidates", str(a.ld3m_candidates),
            *(["--steps", str(a.ld3m_steps)] if a.ld3m_steps else []),
            *(["--lr-z", str(a.ld3m_lr), "--lr-c", str(a.ld3m_lr)] if a.ld3m_lr else []),
            *(["--ld3m-optimizer", a.ld3m_optimizer] if a.ld3m_optimizer else [])]
    return {
        "random": ["--method", "random", *common],
        "rded": ["--method", "rded", *common, "--labels", "online", *teacher, *pick],
        "dace": ["--method", "dace", *common, *prior, *teacher, "--variants", str(a.variants), *pick],
        "d4m": ["--method", "d4m", *common, *prior, *teacher, "--variants", str(a.variants), "--steps", str(a.d4m_steps)],
        "ld3m-dm": ["--method", "ld3m", *common, "--ld3m-loss", "dm", *prior, *ld3m],
        "ld3m-dc": ["--method", "ld3m", *common, "--ld3m-loss", "dc", *prior, *ld3m],
    }.get(row)


def eval_args(row: str, bundle: Path, out: Path, a: argparse.Namespace) -> list[str]:
    """The `ddcodec eval` / `eval-real` arguments of a row."""
    train = ["--student", a.student, "--test-data", a.test_data or a.data, "--test-split", a.test_split,
             "--test-limit", str(a.test_limit),
             "--threads", str(a.threads), "--json", str(out)]
    if row == "real":
        return ["eval-real", "--data", a.data, "--ipc", str(a.ipc), "--subset-seed", "0", *size_args(a), *train,
                "--epochs", str(a.epochs), "--seeds", str(a.seeds)]
    if row == "full":
        return ["eval-real", "--data", a.data, *size_args(a), *train, "--epochs", str(a.full_epochs), "--seeds", str(a.full_seeds)]
    augment = ["--augment", "rrc"] if row == "rded-rrc" else []
    return ["eval", str(bundle), *train, "--epochs", str(a.epochs), "--seeds", str(a.seeds), *augment]


def run(cmd: list[str], log: Path) -> None:
    """Run `ddcodec CMD` as a subprocess, teeing nothing: its output goes to `log`; stop the table on failure."""
    print("$ ddcodec " + shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ ddcodec " + shlex.join(cmd) + "\n")
        f.flush()
        rc = subprocess.call([sys.executable, "-m", "ddcodec.cli", *cmd], stdout=f, stderr=subprocess.STDOUT)
    print(f"  exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
    if rc != 0:
        sys.exit(f"failed: ddcodec {shlex.join(cmd)} (see {log})")


def parser() -> argparse.ArgumentParser:
    """The runner's options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True, help="table name: results go to OUT/NAME/")
    p.add_argument("--data", required=True)
    p.add_argument("--test-data", default=None)
    p.add_argument("--test-split", default="test", help="test split (Imagenette: val)")
    p.add_argument("--image-size", type=int, default=None, help="resize the data to this square size (encodes and eval-real)")
    p.add_argument("--ipc", type=int, required=True)
    p.add_argument("--student", default="convnet3")
    p.add_argument("--teacher", default="cifar10-resnet56-ft")
    p.add_argument("--generator", default=None, metavar="PRIOR",
                   help="prior of the d4m, dace and ld3m encodes (default: the encoder's, builtin:default)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--full-epochs", type=int, default=1, help="epochs of the full-data row")
    p.add_argument("--full-seeds", type=int, default=2)
    p.add_argument("--test-limit", type=int, default=2000)
    p.add_argument("--variants", type=int, default=5, help="d4m/dace variants (epoch e uses variant e mod V)")
    p.add_argument("--d4m-steps", type=int, default=10)
    p.add_argument("--candidates", type=int, default=None,
                   help="rded/dace: real images per class whose crops the teacher scores (default: the method's)")
    p.add_argument("--ld3m-iterations", type=int, default=100)
    p.add_argument("--ld3m-steps", type=int, default=None, help="LD3M scheduler steps T (default: the method's, 10 up to 128 px)")
    p.add_argument("--batch-real", type=int, default=64)
    p.add_argument("--ld3m-lr", type=float, default=None, help="LD3M learning rate of Z and c (default: the paper's per loss)")
    p.add_argument("--ld3m-optimizer", choices=("sgd", "adam"), default=None, help="LD3M optimiser (default: the paper's SGD)")
    p.add_argument("--ld3m-candidates", type=int, default=500)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--work", default="runs", help="where bundles are written (WORK/NAME/ROW)")
    p.add_argument("--bundles-from", default=None, metavar="TABLE",
                   help="use (and make if missing) the bundles of table TABLE, e.g. another student's table of the same data and IPC")
    p.add_argument("--out", default="docs/results")
    return p


def write_table(out: Path) -> str:
    """Rebuild OUT/NAME/table.md from every report there: the runner's rows in their order, then any other kept."""
    known = [out / f"{row}.json" for row in ROWS if (out / f"{row}.json").exists()]
    rows = [str(p) for p in known + sorted(set(out.glob("*.json")) - set(known))]
    table = subprocess.run([sys.executable, str(Path(__file__).with_name("eval_table.py")), *rows, "--commands"],
                           capture_output=True, text=True, check=True).stdout
    (out / "table.md").write_text(table)
    return table


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    out = Path(a.out) / a.name
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.work) / (a.bundles_from or a.name)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    for row in a.rows:
        report = out / f"{row}.json"
        if report.exists():
            print(f"{row}: {report} exists, skipped", flush=True)
            continue
        bundle = work / BUNDLE_OF.get(row, row)
        enc = encode_args(row, a)
        made_by = bundle.with_name(bundle.name + ".command")  # how an existing bundle was made, kept beside it
        cmd = None if enc is None else ["encode", *enc, "--out", str(bundle)]
        encode_command = None if cmd is None else "ddcodec " + shlex.join(cmd)
        if cmd is not None and not (bundle / "manifest.json").exists():
            run(cmd, log)
            made_by.write_text(encode_command + "\n")
        elif cmd is not None and made_by.exists():
            recorded = made_by.read_text().strip()
            if recorded != encode_command:
                print(f"{row}: reusing {bundle}, made by another command than these options give: {recorded}", flush=True)
                encode_command = recorded
        run(eval_args(row, bundle, report, a), log)
        r = json.loads(report.read_text())
        if encode_command is not None:  # the row's full recipe: how its bundle was made, next to how it was evaluated
            r["encode_command"] = encode_command
            report.write_text(json.dumps(r, indent=2) + "\n")
        print(f"{row}: {100 * r['mean']:.2f} ± {100 * r['std']:.2f}", flush=True)
    table = write_table(out)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
