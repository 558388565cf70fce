"""winbuilder: run a build on a Windows server from a Linux CI job.

The workspace goes over, output streams back live, the exact exit code comes back, the workspace comes back, and
nothing is left running or open. See README.md.
"""

__version__ = "0.1.0"
