"""Shared command-line plumbing for the `train`, `sample` and `analysis` entry points.

User errors (bad values, missing or wrong files) end in one line on stderr and exit code 2, with no
traceback; `LDM_LITE_DEBUG=1` shows the traceback. So do the operating system's errors (OSError: a full disk,
a path that cannot be written) and safetensors' errors, which commands mostly catch earlier
(`ldm_lite.checks`).
"""
import os
import sys

from safetensors import SafetensorError

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, KeyError)


def run_main(main, argv=None) -> int:
    """Call main(argv) and turn user errors into one line on stderr and exit code 2."""
    try:
        return main(argv) or 0
    except BrokenPipeError:  # output piped into `head` and closed: not an error
        sys.stderr.close()
        return 0
    except (*USER_ERRORS, OSError, SafetensorError) as error:
        if os.environ.get("LDM_LITE_DEBUG"):
            raise
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as error:
        print(f"interrupted{': ' if str(error) else ''}{error}", file=sys.stderr)
        return 130


def one_line(error: Exception) -> str:
    """The message of a user error on one line; an OSError names its path ('No space left on device: path')."""
    if isinstance(error, KeyError) and error.args:
        message = str(error.args[0])
    elif isinstance(error, OSError) and error.strerror and error.filename is not None:
        target = f" -> {error.filename2!r}" if error.filename2 is not None else ""
        message = f"{error.strerror}: {str(error.filename)!r}{target}"
    elif isinstance(error, SafetensorError):
        message = f"safetensors: {error}"
    else:
        message = str(error)
    return " ".join(message.split())
