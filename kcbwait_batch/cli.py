"""``kcbwait-batch``: windows.kcbwait over many memory images, locally or on a Dask cluster.

kcbwait-batch IMAGE_OR_DIR... --out results.jsonl [--jobs N | --scheduler tcp://HOST:8786]
              [--symbols DIR] [--offline] [--resume] [--hash] [--timeout S] [--format csv]
              [--all-threads | --at-return-only] [--pid N ...] [--tid N ...]

Exit status: 0 every image in the output analysed, 1 some image failed (error, timeout or
crash; see its status record), 2 bad usage or an output that cannot be resumed, 130
interrupted (the output holds whole images only; ``--resume`` continues).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kcbwait_batch import __version__, discovery, records, writer
from kcbwait_batch.backend import Backend, BackendFailure, BackendUnavailable, Done, Stage
from kcbwait_batch.framework_runner import FrameworkConfig
from kcbwait_batch.progress import Progress
from kcbwait_batch.tasks import ImageTask

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
DEFAULT_TIMEOUT = 1800.0
DEFAULT_TASKS_PER_WORKER = 50


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="kcbwait-batch",
        description="Run windows.kcbwait on many memory images (one task per image) in local "
        "worker processes or on a Dask cluster; write one record per reported thread and one "
        "status record per image.",
        epilog="Exit status: 0 all images ok, 1 some image failed, 2 usage error, "
        "130 interrupted (resume with --resume).",
    )
    top.add_argument(
        "inputs",
        nargs="*",
        metavar="IMAGE_OR_DIR",
        help="memory images, or directories to search for them (see --glob)",
    )
    top.add_argument(
        "--list",
        dest="list_file",
        metavar="FILE",
        help="also read image paths from FILE, one per line ('-': stdin)",
    )
    top.add_argument(
        "-o",
        "--out",
        type=Path,
        required=True,
        help="output file (records are appended image by image)",
    )
    top.add_argument(
        "--format",
        choices=writer.FORMATS,
        help="output format (default: from --out's suffix, .csv -> csv, else jsonl)",
    )
    where = top.add_argument_group("where the work runs")
    where.add_argument(
        "-j", "--jobs", type=int, help="local worker processes (default: the cores available)"
    )
    where.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="run on the Dask cluster whose scheduler listens at ADDRESS "
        "(e.g. tcp://10.0.0.5:8786); images and --symbols must be at the same "
        "paths on every worker",
    )
    where.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="per-image time limit; the analysis process is killed after it "
        f"(default {DEFAULT_TIMEOUT:g}, 0: none)",
    )
    where.add_argument(
        "--tasks-per-worker",
        type=int,
        default=DEFAULT_TASKS_PER_WORKER,
        metavar="N",
        help="replace an analysis process after N images "
        f"(bounds memory growth; default {DEFAULT_TASKS_PER_WORKER}, 0: never)",
    )
    vol = top.add_argument_group("Volatility")
    vol.add_argument(
        "-s",
        "--symbols",
        action="append",
        default=[],
        metavar="DIR",
        help="symbol directory (as vol -s); repeatable",
    )
    vol.add_argument(
        "-p",
        "--plugins",
        action="append",
        default=[],
        metavar="DIR",
        help="extra plugin directory (as vol -p); repeatable",
    )
    vol.add_argument(
        "--offline", action="store_true", help="never download symbols (as vol --offline)"
    )
    vol.add_argument(
        "--cache-path", metavar="DIR", help="Volatility cache directory (default: Volatility's own)"
    )
    sel = top.add_argument_group("which images")
    sel.add_argument(
        "-r", "--recursive", action="store_true", help="search directories recursively"
    )
    sel.add_argument(
        "--glob",
        action="append",
        metavar="PATTERN",
        help="file-name pattern for images in directories; repeatable "
        f"(default: {' '.join(discovery.DEFAULT_PATTERNS)})",
    )
    sel.add_argument(
        "--resume",
        action="store_true",
        help="skip images already complete in --out (same path, size and mtime); "
        "drop partial records an interrupted run left",
    )
    sel.add_argument(
        "--retry-failed",
        action="store_true",
        help="with --resume, analyse again the images whose status is not ok",
    )
    rec = top.add_argument_group("records")
    rec.add_argument(
        "--hash", action="store_true", help="add each image's SHA-256 (read by the worker)"
    )
    plug = top.add_argument_group("windows.kcbwait options")
    mode = plug.add_mutually_exclusive_group()
    mode.add_argument(
        "--all-threads", action="store_true", help="every thread, including reason 'none'"
    )
    mode.add_argument(
        "--at-return-only",
        action="store_true",
        help="only threads resting at NtCallbackReturn/ZwCallbackReturn",
    )
    plug.add_argument("--pid", type=int, nargs="+", metavar="N", help="only these processes")
    plug.add_argument("--tid", type=int, nargs="+", metavar="N", help="only these threads")
    plug.add_argument(
        "--stacks",
        action="store_true",
        help="add each listed thread's call stack (windows.kcbstack frames) as 'stack'",
    )
    out = top.add_argument_group("display")
    out.add_argument("-q", "--quiet", action="store_true", help="no progress, no summary")
    out.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show the analysis processes' log (Volatility debug output)",
    )
    out.add_argument(
        "--progress",
        choices=("auto", "bar", "lines"),
        default="auto",
        help="progress bar on a terminal, one line per image otherwise (auto)",
    )
    top.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return top


def plugin_options(args: argparse.Namespace) -> dict[str, Any]:
    """windows.kcbwait's configuration, as recorded in status records."""
    return {
        "all-threads": bool(args.all_threads),
        "at-return-only": bool(args.at_return_only),
        "pid": args.pid,
        "tid": args.tid,
        "stacks": bool(args.stacks),
    }


def volatility_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options that are set (Volatility's config has no use for unset lists)."""
    return {k: v for k, v in options.items() if v is not None and k != "stacks"}


def make_backend(args: argparse.Namespace, log: Progress) -> Backend:
    if args.scheduler:
        from kcbwait_batch.dask_backend import DaskCluster

        return DaskCluster(args.scheduler, args.tasks_per_worker)
    from kcbwait_batch.local_pool import LocalPool

    sink = log.log if args.verbose else None
    return LocalPool(args.jobs, args.tasks_per_worker, verbose=args.verbose, log_sink=sink)


def _usage(message: str) -> int:
    print(f"kcbwait-batch: {message}", file=sys.stderr)
    return EXIT_USAGE


def _plan_resume(
    args: argparse.Namespace,
    fmt: str,
    images: list[records.ImageFile],
    options: dict[str, Any],
) -> tuple[list[records.ImageFile], list[dict[str, Any]]]:
    """Which images still need work, and the kept status records of those that do not.

    Rewrites the output so that it holds exactly the kept images' blocks (partial blocks and
    records of images about to be redone go)."""
    existing = writer.load_existing(args.out, fmt)
    for status in existing.status.values():
        # Files written before --stacks existed have no "stacks" option: they had none.
        if {"stacks": False, **status["options"]} != options:
            raise writer.OutputError(
                f"{args.out} was written with windows.kcbwait options {status['options']}, "
                f"not {options}: use another --out"
            )
    keep: set[str] = set()
    todo = []
    for image in images:
        status = existing.status.get(image.path)
        if (
            status is not None
            and (status["image_size"], status["image_mtime"]) == (image.size, image.mtime)
            and (status["status"] == records.OK or not args.retry_failed)
        ):
            keep.add(image.path)
        else:
            todo.append(image)
    # Images complete in the output but not part of this batch stay as they are.
    keep |= set(existing.status) - {image.path for image in images}
    existing.rewrite(args.out, keep)
    return todo, [existing.status[path] for path in existing.order if path in keep]


def main(argv: Sequence[str] | None = None) -> int:
    # Intermixed: images may follow options too (kcbwait-batch -s DIR --out F img1 img2).
    args = parser().parse_intermixed_args(argv)
    if args.jobs is not None and args.jobs < 1:
        return _usage("--jobs must be at least 1")
    if args.retry_failed and not args.resume:
        return _usage("--retry-failed goes with --resume")
    fmt = args.format or writer.infer_format(args.out)
    inputs = list(args.inputs)
    try:
        if args.list_file:
            inputs += discovery.read_list(args.list_file)
        paths = discovery.find_images(
            inputs, args.glob or discovery.DEFAULT_PATTERNS, args.recursive
        )
        images = [records.ImageFile.stat(p) for p in paths]
    except (discovery.DiscoveryError, OSError) as error:
        return _usage(str(error))
    if not inputs:
        return _usage("no images given (IMAGE_OR_DIR... or --list FILE)")
    options = plugin_options(args)
    if not args.resume and args.out.exists() and args.out.stat().st_size > 0:
        return _usage(f"{args.out} exists: use --resume to continue it, or another --out")

    kept: list[dict[str, Any]] = []
    todo = images
    if args.resume:
        try:
            todo, kept = _plan_resume(args, fmt, images, options)
        except writer.OutputError as error:
            return _usage(str(error))

    interactive = {"auto": None, "bar": True, "lines": False}[args.progress]
    progress = Progress(len(todo), interactive=interactive, quiet=args.quiet)
    summary = records.Summary(images_skipped=len(images) - len(todo))
    framework = FrameworkConfig(
        symbol_dirs=tuple(args.symbols),
        plugin_dirs=tuple(args.plugins),
        offline=args.offline,
        cache_path=args.cache_path,
    )
    tasks = [
        ImageTask(i.path, volatility_options(options), framework, args.hash, args.stacks)
        for i in todo
    ]
    by_path = {image.path: image for image in todo}
    backend = make_backend(args, progress)
    try:
        if tasks:
            backend.start()  # a cluster that is not there fails here, before any output
    except BackendUnavailable as error:
        progress.close()
        return _usage(str(error))
    if tasks:
        progress.log(
            f"kcbwait-batch: {len(tasks)} images ({summary.images_skipped} already complete) "
            f"on {backend.description} -> {args.out}"
        )
    started = time.monotonic()
    interrupted = False
    # A batch scheduler stops jobs with SIGTERM: finish as on Ctrl-C, with whole images only.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        with writer.OutputWriter(args.out, fmt) as out:
            _consume(backend, tasks, args.timeout or None, out, options, by_path, summary, progress)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        signal.signal(signal.SIGTERM, previous)
        backend.close()
        progress.close()
    summary.wall_seconds = time.monotonic() - started
    summary.images_unrun = 0 if interrupted else len(by_path)
    failed_before = sum(1 for s in kept if s["status"] != records.OK)
    if not args.quiet:
        for line in summary.lines():
            print(line, file=sys.stderr)
        if failed_before:
            print(
                f"{failed_before} earlier failed images kept (--retry-failed redoes them)",
                file=sys.stderr,
            )
        if interrupted:
            print(
                f"interrupted: {args.out} holds whole images; add --resume to continue",
                file=sys.stderr,
            )
    if interrupted:
        return EXIT_INTERRUPTED
    failed = summary.images_failed or summary.images_unrun or failed_before
    return EXIT_FAILED if failed else EXIT_OK


def _consume(
    backend: Backend,
    tasks: list[ImageTask],
    timeout: float | None,
    out: writer.OutputWriter,
    options: dict[str, Any],
    pending: dict[str, records.ImageFile],
    summary: records.Summary,
    progress: Progress,
) -> None:
    """Runs ``tasks`` on ``backend``, writing each image's records as its result arrives;
    ``pending`` loses every image that got a result."""
    if not tasks:
        return
    events = backend.run(tasks, timeout)
    try:
        for event in events:
            if isinstance(event, Stage):
                progress.stage(event.image, event.stage)
            elif isinstance(event, Done):
                image = pending.pop(event.image)
                image_records = records.image_records(image, event.outcome, options)
                out.write_image(image_records)
                summary.add(image_records[-1])
                progress.image_done(image_records[-1])
            elif isinstance(event, BackendFailure):
                progress.log(f"kcbwait-batch: the backend failed: {event.message}")
    finally:
        # Stops the work at once when leaving early (Ctrl-C, SIGTERM, a write error).
        events.close()


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
