"""`make bench`: run every scenario and write bench/results/<date>/report.md with tables and plots.

Usage: python -m bench.run [--quick] [--only ceiling,saturation,...,flood,cluster,thermal,soak] [--model PATH]
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
import traceback
from pathlib import Path

from bench.harness import EMBEDDED, REPO, Context, Section, machine
from bench.scenarios import ceiling, cluster, flood, gateway, isolation, peer, scheduler_sim, served, soak, thermal

ORDER = ("ceiling", "saturation", "batching", "isolation", "gateway", "flood", "peer", "cluster", "cluster-sim",
         "thermal", "soak")
# The scenarios run when asked for (ceiling and saturation run first, when asked for or needed).
RUNS = {"isolation": isolation.run, "gateway": gateway.run, "flood": flood.run, "peer": peer.run,
        "cluster": cluster.run, "cluster-sim": scheduler_sim.run, "thermal": thermal.run, "soak": soak.run}
# Scenarios that size their load from saturation (which needs ceiling); flood and gateway need neither.
NEEDS_SATURATION = {"saturation", "batching", "isolation", "peer"}
# The report's sections: flood writes two.
SECTIONS = (*ORDER[: ORDER.index("flood") + 1], "flood-gpu", *ORDER[ORDER.index("flood") + 1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (a smoke test of the bench)")
    parser.add_argument("--only", default=",".join(ORDER), help=f"comma-separated, of: {', '.join(ORDER)}")
    parser.add_argument("--model", type=Path, default=EMBEDDED, help="diffusers pipeline directory")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for every contender")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    wanted = set(args.only.split(","))
    if unknown := wanted - set(ORDER):
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    out = args.out or REPO / "bench" / "results" / dt.date.today().isoformat()
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(out=out, quick=args.quick, threads=args.threads, model_path=args.model.resolve())
    info = machine()
    started = time.time()
    for name in SECTIONS:  # earlier runs' sections in this folder, replaced by whatever runs now
        if (out / f"{name}.json").exists():
            ctx.results[name] = Section.load(out / f"{name}.json")

    ran: list[str] = []
    fresh: set[str] = set()  # sections this run wrote (the rest were loaded from the folder)

    def attempt(name: str, fn) -> None:  # noqa: ANN001
        ran.append(name)
        print(f"[bench] {name} …", flush=True)
        t0 = time.time()
        try:
            result = fn(ctx)
        except Exception as exc:  # noqa: BLE001 - a failed scenario is reported, not hidden
            traceback.print_exc()
            ctx.results[name] = Section(name, f"**failed**: `{type(exc).__name__}: {exc}`")
            fresh.add(name)
            return
        for section in result if isinstance(result, tuple) else (result,):
            ctx.results[section.name] = section
            fresh.add(section.name)
            section.save(out)
        print(f"[bench] {name} done in {time.time() - t0:.0f} s", flush=True)

    # saturation and batching share their runs; the later scenarios size their load from saturation.
    needs_saturation = bool(wanted & NEEDS_SATURATION)
    if "ceiling" in wanted or wanted & {"saturation", "batching"} or (
            needs_saturation and "ceiling" not in ctx.results and "saturation" not in ctx.results):
        attempt("ceiling", ceiling.run)
    if wanted & {"saturation", "batching"} or (needs_saturation and "saturation" not in ctx.results):
        attempt("saturation", served.run)
    for name, scenario in RUNS.items():
        if name in wanted:
            attempt(name, scenario)

    earlier = [n for n in SECTIONS if n in ctx.results and n not in fresh]
    kept = f"; kept from an earlier run in this folder: {', '.join(earlier)}" if earlier else ""
    lines = [
        f"# Kiln benchmark — {dt.date.today().isoformat()}",
        "",
        "| machine | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in info.items()),
        f"| model | `{ctx.model_path.relative_to(REPO) if ctx.model_path.is_relative_to(REPO) else ctx.model_path}` |",
        f"| torch threads | {ctx.threads} |",
        f"| mode | {'quick' if ctx.quick else 'full'} (this run: {', '.join(ran)}, "
        f"{time.time() - started:.0f} s{kept}) |",
        "",
        "Every ratio compares two things measured in this run, on this machine. No GPU was lent to this "
        "run" if info["gpu"] == "none" else f"GPU: {info['gpu']}.",
        "",
    ]
    lines += [ctx.results[name].markdown() for name in SECTIONS if name in ctx.results]
    (out / "report.md").write_text("\n".join(lines))
    print(f"[bench] wrote {out / 'report.md'}")


if __name__ == "__main__":
    main()
