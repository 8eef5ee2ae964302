"""Shared command-line plumbing for the `train`, `sample` and `analysis` entry points.

User errors (bad values, missing or wrong files) end in one line on stderr and exit code 2, with no
traceback; `LDM_LITE_DEBUG=1` shows the traceback.
"""
import os
import sys

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, KeyError)


def run_main(main, argv=None) -> int:
    """Call main(argv) and turn user errors into one line on stderr and exit code 2."""
    try:
        return main(argv) or 0
    except USER_ERRORS as error:
        if os.environ.get("LDM_LITE_DEBUG"):
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"error: {message}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and closed: not an error
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
