"""`radial-lora` command line: one module per subcommand, each with `register(subparsers)`."""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys

from radial_lora.locks import EXIT_BUSY, FolderBusy

# Each module defines register(subparsers) and sets a `func` default on its parser(s).
_COMMAND_MODULES: list[str] = ["data", "train", "generate", "evaluate", "score", "mask", "plan", "demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="radial-lora",
        description="Extend video diffusion transformers to longer videos with Radial Attention + LoRA.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(f"radial_lora.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    name = f"radial-lora {args.command}"
    try:
        return int(args.func(args) or 0)
    except FolderBusy as exc:  # another run writes that folder now: the same command may work later
        print(f"{name}: error: {exc}", file=sys.stderr)
        return EXIT_BUSY
    except (ValueError, FileNotFoundError) as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted; everything finished is kept: run the same command to go on", file=sys.stderr)
        return 130
    except OSError as exc:  # a full disk, a read-only or missing output place, a file where a folder should be
        logging.getLogger(__name__).debug("%s failed", name, exc_info=True)
        print(f"{name}: error: {os_error_line(exc)}", file=sys.stderr)
        return 1
    finally:
        if "torch.distributed" in sys.modules:  # only a command that imported torch can have joined a job
            from radial_lora.parallel import close_distributed

            close_distributed()


_NO_PERMISSION = "no permission to write there: choose another --out / output_dir, or fix its permissions"
_FILE_IN_THE_WAY = "a file is in the way: --out / output_dir must be a folder (or not exist yet)"
_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free space, then run the same command again (finished work is kept)",
    errno.EDQUOT: "the disk quota is used up: free space, then run the same command again",
    errno.EROFS: "that file system is read-only: choose another --out / output_dir",
    errno.EACCES: _NO_PERMISSION,
    errno.EPERM: _NO_PERMISSION,
    errno.EEXIST: _FILE_IN_THE_WAY,
    errno.ENOTDIR: _FILE_IN_THE_WAY,
}


def os_error_line(exc: OSError) -> str:
    """One line for a failed file operation: what failed, on which path, and what to do."""
    where = f" ({exc.filename})" if exc.filename else ""
    hint = _OS_HINTS.get(exc.errno or -1, "check the path and the disk, then run the same command again")
    return f"{exc.strerror or exc}{where}; {hint}"


if __name__ == "__main__":
    sys.exit(main())
