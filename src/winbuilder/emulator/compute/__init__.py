"""An emulated Compute Engine v1 REST API (moto style) with emulated Windows guests.

Layers: ``schema`` (the discovery document and body validation), ``routes`` (URL -> method id), ``api`` (request
parsing, no state), ``resources`` and ``filters`` (pure builders, semantic validation, list filters), ``models``
(state keyed by project and zone, resettable), ``faults`` (the fault schedule), ``server`` (HTTP, the metadata
server, ``start_gce`` and ``main()``). See ``COVERAGE.md`` in this folder for what is covered.
"""
