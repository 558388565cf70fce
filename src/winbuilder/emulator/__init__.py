"""Local, real-protocol stand-ins for what winbuilder talks to: a Windows host (WS-Management server and an OpenSSH
sshd, both running a ``cmd.exe`` subset), and (``compute/``) the Compute Engine REST API with emulated guests.

It emulates the protocols, not Windows. Nothing here is imported by the product code in ``winbuilder``.
"""
