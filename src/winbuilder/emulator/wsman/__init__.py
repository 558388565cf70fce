"""Emulated WS-Management (WinRM) server: ``envelope`` (sans-IO XML), ``auth`` (NTLM/Basic, message encryption),
``shells`` (WinRS shell and command state), ``faults`` (injected failures), ``server`` (HTTP(S) and ``main``).
"""
