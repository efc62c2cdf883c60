"""Scaling of one frozen recipe over 1, 2 and 4 GPUs (Ulysses under torchrun), and CUDA graphs on vs off.

Every phase is the real command, `python -m flux2lab.run` (under `torchrun --nproc-per-node N` for N > 1), on
the same frozen config: `full-random` (the full FLUX.2 [dev] transformer, random weights), 1024x1024, 50 steps,
TeaCache on with its real decisions (reduced over the ranks). Each phase makes `--warmup` untimed images, then
`--images` timed ones; the runner records time per image and per step and the steps each rank skipped.

    python scripts/gpu_scaling.py --out reports/benchmarks/gpu_scaling          # a 4-GPU machine, < 9 min
    python scripts/gpu_scaling.py --model tiny --device cpu --size 64 --steps 6 --gpus 1,2 --out /tmp/s  # CPU check

Phases run one after another (timings are not shared with any other job), the required ones first: eager on
1, 2, 4 GPUs, then CUDA graphs on 1 GPU, then CUDA graphs on 2 and 4 GPUs while the time budget lasts.

--out stays small (the device returns few files): gpu_scaling.json (each phase's timings and records),
gpu_scaling.md (the table and the issue's targets checked), gpu_scaling.log (the phases' output) and the two
frozen configs. Both reports are rewritten after every phase, so a run cut short keeps what finished. Images or
latents go to a scratch folder (--work, default a temporary one) and are deleted after each phase. A phase is
killed after --phase-timeout seconds, or --exit-grace seconds after it wrote summary.json without exiting; its
timings are still reported, with "hung at exit after N s".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {2: 1.85, 4: 3.4}  # speedup over 1 GPU that issue 7 asks for


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "benchmarks" / "gpu_scaling")
    p.add_argument("--model", default="full-random")
    p.add_argument("--device", default="cuda", help="cuda | cpu (cpu: a functional check with gloo)")
    p.add_argument("--size", type=int, default=1024, help="height = width (default 1024)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--gpus", default="1,2,4", help="process counts to compare (default 1,2,4)")
    p.add_argument("--warmup", type=int, default=1, help="untimed images per phase (default 1)")
    p.add_argument("--images", type=int, default=2, help="timed images per phase (default 2)")
    p.add_argument("--no-teacache", action="store_true", help="measure without TeaCache")
    p.add_argument("--budget-s", type=float, default=530, help="stop starting phases after this (default 530)")
    p.add_argument("--phase-timeout", type=float, default=300, help="kill a phase after this (default 300 s)")
    p.add_argument("--exit-grace", type=float, default=60,
                   help="kill a phase this long after it wrote summary.json without exiting, and report it as "
                        "hung at exit (default 60 s)")
    p.add_argument("--work", type=Path, help="scratch folder for the phases' images/latents (default: temporary)")
    p.add_argument("--pg-timeout", type=float, default=180)
    return p


def freeze_configs(args: argparse.Namespace) -> dict[bool, Path]:
    from flux2lab.pipeline.frozen import freeze
    from flux2lab.pipeline.recipe import Recipe

    recipe = Recipe(height=args.size, width=args.size, steps=args.steps).replace(
        teacache={"enabled": not args.no_teacache, "ret_steps": min(10, args.steps)})
    paths = {}
    for graphs in (False, True):
        prov = {"notes": "scripts/gpu_scaling.py: speed measurement on random weights (no quality meaning)"}
        paths[graphs] = freeze(recipe.replace(cuda_graphs=graphs), args.model, prov).save(
            args.out / f"config{'_graphs' if graphs else ''}.json")
    return paths


def _descendants(pid: int) -> list[int]:
    """pid's child processes, recursively (Linux /proc). torchrun starts each worker in a session of its own, so
    killing torchrun's process group would leave the workers, and their GPUs, behind."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (torchrun passes it to its workers), then SIGKILL whatever of the tree is left after 20 s."""
    tree = _descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    for pid in [*tree, proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything else of its session
    except ProcessLookupError:
        pass
    proc.wait()


def watch(cmd: list[str], log: Path, summary: Path, timeout: float, grace: float, **popen) -> tuple[int, str, float]:
    """Run `cmd` with its output in `log`; return (exit status, how it ended, seconds). It ends "ok", "rc N",
    "hung at exit after N s" (killed `grace` s after `summary` appeared) or "timed out after N s" (killed)."""
    start = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, **popen)
    written = None
    while proc.poll() is None:
        now = time.monotonic()
        if written is None and summary.is_file():
            written = now
        if written is not None and now - written > grace:
            how = f"hung at exit after {now - written:.0f} s"
            break
        if now - start > timeout:
            how = f"timed out after {now - start:.0f} s"
            break
        time.sleep(0.5)
    else:
        return proc.returncode, "ok" if proc.returncode == 0 else f"rc {proc.returncode}", time.monotonic() - start
    _stop(proc)
    return proc.returncode, how, time.monotonic() - start


def run_phase(args, name: str, nproc: int, config: Path, prompts: Path, timeout: float) -> dict:
    out = args.work / name
    shutil.rmtree(out, ignore_errors=True)  # a fresh measurement, not a resumed one
    run_args = ["-m", "flux2lab.run", "--config", str(config), "--prompts", str(prompts), "--out", str(out),
                "--device", args.device, "--warmup", str(args.warmup), "--pg-timeout", str(args.pg_timeout)]
    if nproc == 1:
        cmd = [sys.executable, *run_args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *run_args]
    env = dict(os.environ)
    if args.device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(nproc))
    log_path = args.work / f"{name}.log"
    rc, how, elapsed = watch(cmd, log_path, out / "summary.json", timeout, args.exit_grace, cwd=ROOT, env=env)
    log = log_path.read_text(errors="replace")
    with open(args.out / "gpu_scaling.log", "a") as f:
        f.write(f"===== {name}: {nproc} process(es), {how}, {elapsed:.0f} s =====\n{log[-20000:]}\n")
    result = {"name": name, "gpus": nproc, "rc": rc, "exit": how, "elapsed_s": round(elapsed, 1)}
    try:
        summary = json.loads((out / "summary.json").read_text())
        records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    except (OSError, ValueError):  # no results: the phase failed before its summary
        result["error"] = log[-1500:]
        return result
    finally:
        shutil.rmtree(out, ignore_errors=True)  # images/latents: the timings are all we keep
    if how != "ok":
        result["log_tail"] = log[-1500:]
    computed_steps = [
        s for r in records for i, s in enumerate(r["step_s"])
        if i > 0 and (not r["teacache"] or r["teacache"][i]["computed"])
    ]
    result.update(
        device=summary["device"], images=len(records), s_per_image=summary["mean_wall_s"],
        s_per_step=summary["mean_step_s"],
        s_per_computed_step=sum(computed_steps) / len(computed_steps) if computed_steps else None,
        skipped_steps=[r["skipped_steps"] for r in records],
        ranks_agree=all(all(s == r["skipped_steps"] for s in r.get("skipped_steps_by_rank", [r["skipped_steps"]]))
                        for r in records),
        graph_captures=summary["cuda_graph_captures"],
        records=[{k: r[k] for k in ("id", "seed", "wall_s", "step_s", "skipped_steps", "skipped_steps_by_rank")
                  if k in r} for r in records],
    )
    return result


def markdown(report: dict) -> str:
    rows = [("| phase | GPUs | s/image | s/step | s/computed step | speedup (same mode) | speedup vs eager 1 GPU "
             "| skipped steps (per image) | ranks agree | exit |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["phases"]:
        if "error" in r or "skipped" in r:
            rows.append(f"| {r['name']} | {r['gpus']} | {r.get('skipped') or 'failed'} | | | | | | | "
                        f"{r.get('exit', '-')} |")
            continue
        def x(v, fmt):
            return format(v, fmt) if v is not None else "-"

        rows.append(
            f"| {r['name']} | {r['gpus']} | {x(r['s_per_image'], '.2f')} | {x(r['s_per_step'], '.3f')} | "
            f"{x(r['s_per_computed_step'], '.3f')} | {x(r.get('speedup'), '.2f')} | "
            f"{x(r.get('speedup_vs_eager_1gpu'), '.2f')} | {', '.join(str(len(s)) for s in r['skipped_steps'])} | "
            f"{r['ranks_agree']} | {r['exit']} |")
    checks = [f"- {c['what']}: {c['value']} (target {c['target']}) -> **{'PASS' if c['ok'] else 'FAIL'}**"
              for c in report["checks"]]
    head = (f"# Ulysses scaling and CUDA graphs: {report['model']}, {report['size']}x{report['size']}, "
            f"{report['steps']} steps, TeaCache {'off' if report['no_teacache'] else 'on'}\n\n"
            f"Device: {report['device']}; {report['warmup']} warm-up + {report['images']} timed image(s) per "
            f"phase; speedup = s/image on 1 GPU / s/image. Phases ran one at a time."
            f"{'' if report['complete'] else ' **Partial: phases still running or cut off.**'}\n")
    notes = "\n".join(f"- {n}" for n in report["notes"]) or "- none"
    return "\n".join([head, *rows, "", "## Targets", *checks, "", "## Notes", notes, ""])


def write_report(args: argparse.Namespace, phases: list[dict], total_s: float, complete: bool) -> str:
    """Speedups and targets from the phases so far; gpu_scaling.json/.md rewritten; returns the markdown."""
    notes = []
    ok = {p["name"]: p for p in phases if "s_per_image" in p}
    for p in ok.values():
        base = ok.get(p["name"].split("_")[0] + "_1gpu")
        if base:
            p["speedup"] = base["s_per_image"] / p["s_per_image"]
            if p["skipped_steps"] != base["skipped_steps"]:
                notes.append(f"{p['name']} skipped other steps than on 1 GPU (distances summed in another "
                             "order); compare s/computed step too.")
        if "eager_1gpu" in ok:
            p["speedup_vs_eager_1gpu"] = ok["eager_1gpu"]["s_per_image"] / p["s_per_image"]
        if p["exit"] != "ok":
            notes.append(f"{p['name']}: timings are complete but the job did not end cleanly ({p['exit']}).")
    checks = []
    for n, target in TARGETS.items():
        for mode in ("eager", "graphs"):
            p = ok.get(f"{mode}_{n}gpu")
            if p and "speedup_vs_eager_1gpu" in p:
                checks.append({"what": f"speedup on {n} GPUs ({mode}) over eager 1 GPU",
                               "value": round(p["speedup_vs_eager_1gpu"], 2), "target": f">= {target}",
                               "ok": p["speedup_vs_eager_1gpu"] >= target})
    if "graphs_1gpu" in ok and "eager_1gpu" in ok:
        ratio = ok["graphs_1gpu"]["speedup_vs_eager_1gpu"]
        checks.append({"what": "CUDA graphs vs eager on 1 GPU (eager s/image / graphs s/image)",
                       "value": round(ratio, 3), "target": ">= 1.0", "ok": ratio >= 1.0})
    for mode in ("eager", "graphs"):
        ran = [p for p in phases if p["name"].startswith(mode) and "skipped" not in p]
        if ran:
            fine = all("error" not in p and p["exit"] == "ok" and p["ranks_agree"] for p in ran)
            checks.append({"what": f"{mode} phases: finished and exited (no hang), TeaCache decisions identical "
                                   "on all ranks", "value": fine, "target": "True", "ok": fine})
    report = {
        "model": args.model, "size": args.size, "steps": args.steps, "no_teacache": args.no_teacache,
        "warmup": args.warmup, "images": args.images,
        "device": next((p["device"] for p in phases if "device" in p), args.device), "host": platform.node(),
        "total_s": round(total_s, 1), "complete": complete, "phases": phases, "checks": checks, "notes": notes,
    }
    (args.out / "gpu_scaling.json").write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    (args.out / "gpu_scaling.md").write_text(md)
    return md


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_scaling.log").write_text("")
    with tempfile.TemporaryDirectory(prefix="gpu_scaling_") as tmp:
        args.work = args.work or Path(tmp)
        args.work.mkdir(parents=True, exist_ok=True)
        configs = freeze_configs(args)
        prompts = args.work / "prompts.txt"
        prompts.write_text("".join(f"a scaling benchmark prompt, image {i}\n" for i in range(args.images)))
        gpus = [int(g) for g in args.gpus.split(",")]
        plan = [(f"eager_{n}gpu", n, False) for n in gpus]
        if args.device == "cuda":
            plan += [(f"graphs_{n}gpu", n, True) for n in gpus]
        phases: list[dict] = []
        for i, (name, n, graphs) in enumerate(plan):
            left = args.budget_s - (time.monotonic() - t0)
            one = next((p for p in phases if p["gpus"] == 1 and "s_per_image" in p), None)
            estimate = one["elapsed_s"] / n + 30 if one else 0  # a rough guess: startup + work / n
            if left < max(estimate, 30):
                phases.append({"name": name, "gpus": n, "skipped": f"time budget ({left:.0f} s left)"})
            else:
                print(f"[{time.monotonic() - t0:5.0f} s] {name} ...", flush=True)
                phases.append(run_phase(args, name, n, configs[graphs], prompts,
                                        timeout=min(left, args.phase_timeout)))
            md = write_report(args, phases, time.monotonic() - t0, complete=i == len(plan) - 1)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
