"""Test support for ut-tunnel: what the test suite and the benchmarks share.

Like asyncpg's ``_testbase``, it lives inside the package so that ``tests/``, ``bench/``
and ``scripts/`` import it the same way, with no ``sys.path`` edits:

* ``certs``: a throw-away PKI (CA, server, clients, a foreign CA) made with ``ut.pki``;
* ``tunnelkit``: real tunnels on loopback (server, client, a UDP echo and peer) and
  helpers to run a coroutine on either loop or fast path;
* ``fakes``: a transport, a UDP port and an open lane with no network, for unit tests;
* ``faultproxy``: a TCP proxy that delays, throttles, stalls, corrupts or cuts lanes;
* ``netbed``: the real-WireGuard test bed in network namespaces (root);
* ``linkemu``: a userspace link emulator (delay, loss, reordering, rate) between them;
* ``dpi``: pcap reading, TLS record extraction and ``ndpiReader`` for the DPI tests;
* ``ja4``: the JA4 fingerprint of a ClientHello.

Nothing in ``ut`` itself imports it.
"""
