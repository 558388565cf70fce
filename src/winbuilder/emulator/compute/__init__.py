"""An emulated Compute Engine v1 REST API (moto style) with emulated Windows guests.

Layers: ``schema`` (the discovery document), ``routes`` (URL -> method id), ``api`` (request parsing and
validation, no state), ``models`` (state keyed by project and zone, resettable), ``server`` (HTTP, metadata
server, ``main()``). See ``COVERAGE.md`` in this folder for what is covered.
"""
