"""Running a pipeline: timing, verification after each pass, and instruments.

The manager owns only what every run needs: it runs the passes in order, times them, verifies
the IR after each one (so a broken module is blamed on the pass that broke it, not on whatever
fails three passes later) and keeps one record per pass for the artifact's manifest.  Everything
optional (timing tables, IR dumps, progress bars, bisection) is an instrument, TVM
PassInstrument style: an object with any of these methods, called in order

    start(passes, module)                                    before the first pass
    before_pass(pass_, module, index)                        index counts from 1
    after_pass(pass_, module, index, changed, seconds)       after the pass ran and verified
    finish(module)                                           when the pipeline ends, also on error

so new tooling plugs in without the manager knowing about it.
"""
from __future__ import annotations

import difflib
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

from amxc.ir import Module, VerifyError, print_module, verify

from .base import Pass, PassError
from .pipeline import format_pipeline


@dataclass(frozen=True)
class PassRecord:
    """What ran, for the manifest: enough to tell whether two artifacts saw the same passes."""
    name: str
    spec: str
    version: int
    origin: str
    changed: bool
    seconds: float

    def to_json(self) -> dict:
        return {**asdict(self), "seconds": round(self.seconds, 6)}


class PassManager:
    """Runs configured passes over a module; see the module docstring for instruments."""

    def __init__(self, passes: Iterable[Pass], *, verify_each: bool = True, instruments: Iterable = ()):
        self.passes = list(passes)
        self.verify_each = verify_each
        self.instruments = list(instruments)
        self.records: list[PassRecord] = []

    @property
    def pipeline(self) -> str:
        """The canonical pipeline string of the passes this manager runs."""
        return format_pipeline(self.passes)

    def run(self, module: Module) -> Module:
        """Run every pass on `module` (in place) and return it.  With verify_each the input is
        verified first, so an invalid input is not blamed on the first pass."""
        self.records = []
        if self.verify_each:
            verify(module)
        self._notify("start", self.passes, module)
        try:
            for index, pass_ in enumerate(self.passes, 1):
                self._run_one(pass_, module, index)
        finally:
            self._notify("finish", module)
        return module

    def _run_one(self, pass_: Pass, module: Module, index: int) -> None:
        self._notify("before_pass", pass_, module, index)
        t0 = time.perf_counter()
        try:
            changed = pass_.run(module)
        except PassError as e:   # the pass refuses this module: one line that names the pass
            raise PassError(f"pass #{index} '{pass_.spec()}' ({pass_.origin}): {e}") from e
        except Exception as e:   # a bug in the pass: keep its traceback, say which pass it was
            if hasattr(e, "add_note"):      # Python 3.11+; on 3.10 the traceback alone tells
                e.add_note(f"while running pass #{index} '{pass_.spec()}' ({pass_.origin})")
            raise
        seconds = time.perf_counter() - t0
        if not isinstance(changed, bool):
            raise PassError(f"pass #{index} '{pass_.spec()}' ({pass_.origin}) returned {changed!r}; "
                            f"run() must return True if it changed the module, else False")
        if self.verify_each:
            try:
                verify(module)
            except VerifyError as e:
                raise PassError(f"pass #{index} '{pass_.spec()}' ({pass_.origin}) left invalid IR: "
                                f"{e}") from e
        self.records.append(PassRecord(pass_.name, pass_.spec(), pass_.version, pass_.origin,
                                       changed, seconds))
        self._notify("after_pass", pass_, module, index, changed, seconds)

    def _notify(self, hook: str, *args) -> None:
        for instrument in self.instruments:
            method = getattr(instrument, hook, None)
            if method is not None:
                method(*args)


class Timing:
    """Collects each pass's wall time; `render()` is the table `--timing` prints."""

    def __init__(self):
        self.rows: list[tuple[int, str, float, bool]] = []     # index, spec, seconds, changed

    def after_pass(self, pass_: Pass, module: Module, index: int, changed: bool, seconds: float) -> None:
        self.rows.append((index, pass_.spec(), seconds, changed))

    @property
    def total(self) -> float:
        return sum(r[2] for r in self.rows)

    def render(self) -> str:
        total = self.total
        width = max([len(r[1]) for r in self.rows] + [len("total")])
        lines = [f"  #  {'pass':<{width}}  {'time':>10}  {'share':>6}  changed"]
        for index, spec, seconds, changed in self.rows:
            share = 100 * seconds / total if total else 0.0
            lines.append(f"{index:>3}  {spec:<{width}}  {_ms(seconds)}  {share:>5.1f}%  "
                         f"{'yes' if changed else 'no'}")
        lines.append(f"     {'total':<{width}}  {_ms(total)}")
        return "\n".join(lines)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:>7.1f} ms"


_WHEN = re.compile(r"(before|after):(\S+)")


class DumpIR:
    """Writes the IR as text at the points `when` names, numbered by pipeline position:

        00-input.ir                  the module the pipeline starts from (always)
        03-before-fuse-attention.ir  'before:fuse-attention' or 'before:all'
        03-fuse-attention.ir         'after:fuse-attention' or 'after:all'
        03-fuse-attention.diff       with diff=True: unified diff of what pass 03 changed,
                                     for each dumped pass whose IR changed

    Earlier numbered dumps in `directory` are removed first, so a listing shows one run."""

    def __init__(self, directory: str | Path, when: Sequence[str], diff: bool = False):
        self.directory = Path(directory)
        self.diff = diff
        self.points: set[tuple[str, str]] = set()
        for entry in when:
            m = _WHEN.fullmatch(entry.strip())
            if m is None:
                raise PassError(f"dump point '{entry}': expected before:all, after:all, "
                                f"before:NAME or after:NAME")
            self.points.add((m.group(1), m.group(2)))
        self.written: list[Path] = []
        self._width = 2
        self._last: tuple[int, str, str] = (0, "", "")   # (passes run, file name, IR text) of the latest dump
        self._before: tuple[str, str] | None = None       # (label, IR text) the current pass started from

    def check(self, passes: Sequence[Pass]) -> None:
        """Reject a dump point that names a pass the pipeline does not run (a typo would
        otherwise silently dump nothing)."""
        names = {p.name for p in passes}
        unknown = sorted(name for _, name in self.points if name != "all" and name not in names)
        if unknown:
            raise PassError(f"dump point names pass '{unknown[0]}', which is not in the pipeline "
                            f"'{format_pipeline(passes)}'")

    def start(self, passes: Sequence[Pass], module: Module) -> None:
        self.check(passes)
        self.directory.mkdir(parents=True, exist_ok=True)
        for old in self.directory.iterdir():
            if re.fullmatch(r"\d{2,}-.*\.(ir|diff)", old.name) and old.is_file():
                old.unlink()
        self._width = max(2, len(str(len(passes))))
        self._dump(f"{self._number(0)}-input.ir", print_module(module), done=0)

    def _wants(self, phase: str, pass_: Pass) -> bool:
        return (phase, "all") in self.points or (phase, pass_.name) in self.points

    def before_pass(self, pass_: Pass, module: Module, index: int) -> None:
        number, tag = self._number(index), _file_name(pass_)
        self._before = None
        if self._wants("before", pass_):
            self._dump(f"{number}-before-{tag}.ir", print_module(module), done=index - 1)
        if self.diff and (self._wants("before", pass_) or self._wants("after", pass_)):
            done, last_name, last_text = self._last
            if done == index - 1:        # the latest dump already holds this IR: reuse it
                self._before = (last_name, last_text)
            else:
                self._before = (f"IR before {number}-{tag}", print_module(module))

    def after_pass(self, pass_: Pass, module: Module, index: int, changed: bool, seconds: float) -> None:
        dump = self._wants("after", pass_)
        if not (dump or self._before):
            return
        name = f"{self._number(index)}-{_file_name(pass_)}"
        text = print_module(module)
        if dump:
            self._dump(f"{name}.ir", text, done=index)
        if self._before and self._before[1] != text:
            label, before = self._before
            diff = difflib.unified_diff(before.splitlines(keepends=True), text.splitlines(keepends=True),
                                        fromfile=label, tofile=f"{name}.ir" if dump else f"IR after {name}")
            self._save(f"{name}.diff", "".join(diff))

    def _number(self, index: int) -> str:
        return f"{index:0{self._width}d}"

    def _dump(self, name: str, text: str, done: int) -> None:
        """Save the IR as it is after `done` passes; a later diff may start from it."""
        self._save(name, text)
        self._last = (done, name, text)

    def _save(self, name: str, text: str) -> None:
        path = self.directory / name
        path.write_text(text)
        self.written.append(path)


def _file_name(pass_: Pass) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", pass_.name)
