"""Import cost of a statement, by package, from `python -X importtime` in a fresh interpreter (stdlib only).

    python3 bench/import_time.py "import ember.cli" --top 25
    python3 bench/import_time.py --serve                  # what `ember serve` imports before loading weights
    python3 bench/import_time.py --serve --tokenizer DIR  # ... and while loading that tokenizer
    python3 bench/import_time.py --serve --runs 3         # best of 3 (the first run also pays a cold page cache)
    python3 bench/import_time.py --engine "tiny-llama --load-format dummy --tokenizer .tok --enforce-eager"
                                                          # ... and everything imported while the engine loads

Per package: `self` is the time spent in its own modules (these add up to the total); `cumulative` is the time of
its outermost imports, dependencies included (what importing it first cost; these overlap). `wall` is the whole
subprocess, interpreter start and the statement's own work included.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field

# What `ember serve` imports before the weights are read: the CLI, the HTTP server (launcher, app), and what the
# engine factory imports in the load thread (engine, model, loader, tokenizer).
SERVE_IMPORTS = ("import ember.cli, ember.server.launcher, ember.server.faults, ember.engine.async_engine; "
                 "ember.cli.build_parser()")
TOKENIZER_LOAD = "; from ember.tokenizer import Tokenizer; Tokenizer.load({dir!r}, None, set())"
# The engine as `ember serve ARGS` builds it (weights, KV cache, warm-up): imports made lazily during the load count.
ENGINE_LOAD = ("; import shlex; from ember.engine.llm_engine import LLMEngine; "
               "LLMEngine(ember.cli.engine_config_from_args(ember.cli.build_parser().parse_args("
               "['serve', *shlex.split({args!r})])))")

_LINE = re.compile(r"^import time:\s+(\d+)\s+\|\s+(\d+)\s+\|(\s+)(\S+)\s*$")


@dataclass
class Module:
    name: str
    self_us: int
    cumulative_us: int
    level: int
    parent: Module | None = None
    children: list[Module] = field(default_factory=list)

    @property
    def package(self) -> str:
        return self.name.split(".", 1)[0]


def parse(stderr: str) -> list[Module]:
    """The -X importtime lines as a forest. Lines come children first, each indented two spaces per level."""
    modules: list[Module] = []
    pending: dict[int, list[Module]] = {}  # level -> modules whose parent has not been printed yet
    for line in stderr.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        level = (len(m.group(3)) - 1) // 2
        mod = Module(m.group(4), int(m.group(1)), int(m.group(2)), level)
        mod.children = pending.pop(level + 1, [])
        for child in mod.children:
            child.parent = mod
        pending.setdefault(level, []).append(mod)
        modules.append(mod)
    return modules


def measure(statement: str, python: str) -> tuple[list[Module], float, str]:
    """The import forest, the subprocess's wall time and its raw -X importtime output."""
    t0 = time.perf_counter()
    proc = subprocess.run([python, "-X", "importtime", "-c", statement], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join(line for line in proc.stderr.splitlines() if not line.startswith("import time:"))
        raise SystemExit(f"the statement failed (exit {proc.returncode}):\n{tail[-4000:]}")
    return parse(proc.stderr), wall, proc.stderr


def by_package(modules: list[Module]) -> dict[str, tuple[int, int, int]]:
    """package -> (self us, cumulative us of its outermost imports, module count)."""
    out: dict[str, tuple[int, int, int]] = {}
    for mod in modules:
        s, c, n = out.get(mod.package, (0, 0, 0))
        outermost = all(p.package != mod.package for p in _ancestors(mod))
        out[mod.package] = (s + mod.self_us, c + (mod.cumulative_us if outermost else 0), n + 1)
    return out


def _ancestors(mod: Module) -> list[Module]:
    out = []
    while mod.parent is not None:
        mod = mod.parent
        out.append(mod)
    return out


def why(modules: list[Module], package: str) -> str:
    """The chain of imports that first brought `package` in, outermost first."""
    for mod in modules:  # children come first: the first hit is the earliest import
        if mod.package == package and (mod.parent is None or mod.parent.package != package):
            chain = [mod, *_ancestors(mod)][::-1]
            return " -> ".join(f"{m.name} ({m.cumulative_us / 1e6:.3f} s)" for m in chain)
    return f"{package}: not imported"


def report(modules: list[Module], wall: float, top: int, sort: str) -> None:
    total = _total(modules)
    pkgs = by_package(modules)
    key = 0 if sort == "self" else 1
    print(f"{'package':<32} {'self s':>8} {'cumul s':>8} {'modules':>8}")
    for name, (s, c, n) in sorted(pkgs.items(), key=lambda kv: -kv[1][key])[:top]:
        print(f"{name:<32} {s / 1e6:8.3f} {c / 1e6:8.3f} {n:8d}")
    print(f"total imports: {total / 1e6:.3f} s in {len(modules)} modules; wall (subprocess): {wall:.3f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("statement", nargs="?", default=None, help='Python code to time, e.g. "import ember.cli"')
    ap.add_argument("--serve", action="store_true", help="the imports of `ember serve` before the weights load")
    ap.add_argument("--tokenizer", default=None, metavar="DIR",
                    help="with --serve: also load this tokenizer directory (its lazy imports count too)")
    ap.add_argument("--engine", default=None, metavar="ARGS",
                    help="--serve, then build the engine as `ember serve ARGS` would (lazy imports count too)")
    ap.add_argument("--top", type=int, default=25, help="packages to list")
    ap.add_argument("--sort", choices=["self", "cumulative"], default="cumulative")
    ap.add_argument("--runs", type=int, default=1, help="report the run with the lowest total")
    ap.add_argument("--python", default=sys.executable, help="interpreter to run (default: this one)")
    ap.add_argument("--why", action="append", default=[], metavar="PACKAGE",
                    help="print the import chain that first brought PACKAGE in (repeatable)")
    ap.add_argument("--raw", default=None, metavar="FILE", help="write the reported run's -X importtime lines here")
    args = ap.parse_args()
    serve = args.serve or args.engine is not None
    if serve == (args.statement is not None):
        ap.error("give a statement or --serve/--engine, not both")
    statement = args.statement or SERVE_IMPORTS
    if args.tokenizer:
        statement += TOKENIZER_LOAD.format(dir=args.tokenizer)
    if args.engine is not None:
        statement += ENGINE_LOAD.format(args=args.engine)
    print(f"$ {args.python} -X importtime -c {statement!r}")
    runs = [measure(statement, args.python) for _ in range(max(1, args.runs))]
    modules, wall, raw = min(runs, key=lambda r: _total(r[0]))
    if args.runs > 1:
        print("totals: " + ", ".join(f"{_total(r[0]) / 1e6:.3f}" for r in runs) + " s")
    report(modules, wall, args.top, args.sort)
    for package in args.why:
        print("why " + why(modules, package))
    if args.raw:
        with open(args.raw, "w") as f:
            f.write(raw)


def _total(modules: list[Module]) -> int:
    return sum(m.cumulative_us for m in modules if m.level == 0)


if __name__ == "__main__":
    main()
