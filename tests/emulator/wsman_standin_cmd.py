"""Stand-in for the emulated cmd.exe used by the WS-Man tests until/unless winbuilder.emulator.cmd is available.

Same argv contract: ``--root R --cwd W --exit-code-file F -c LINE``. Understands ``exit /b N`` (any 32-bit N,
written to the exit-code file), ``timeout /t N``, and otherwise runs LINE with /bin/sh in ROOT.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--cwd", required=True)
    p.add_argument("--user", default="")
    p.add_argument("--exit-code-file", required=True)
    p.add_argument("-c", dest="line", required=True)
    a = p.parse_args()
    m = re.fullmatch(r"\s*exit /b (\d+)\s*", a.line)
    if m:
        code = int(m.group(1))
        with open(a.exit_code_file, "w") as fh:
            fh.write(str(code))
        return code & 0xFF
    m = re.fullmatch(r"\s*timeout /t (\d+)\s*", a.line)
    if m:
        time.sleep(int(m.group(1)))
        return 0
    os.chdir(a.root)
    os.execv("/bin/sh", ["/bin/sh", "-c", a.line])  # noqa: S606 - the stand-in runs the line like cmd /c
    return 127


if __name__ == "__main__":
    sys.exit(main())
