"""Scripted VM networking labs: a TOML file builds a network, runs guests and checks traffic.

* :mod:`~vhostkit.lab.spec`: the lab file format, :func:`~vhostkit.lab.spec.load_lab`, and every
  check a file must pass (mistakes with their line and key);
* :mod:`~vhostkit.lab.network`: the lab's namespaces, bridges, veth pairs and taps;
* :mod:`~vhostkit.lab.guest` and :mod:`~vhostkit.lab.iphost`: the ``virtual`` guest process;
* :mod:`~vhostkit.lab.runner`: :func:`~vhostkit.lab.runner.run_lab`, teardown included;
* :mod:`~vhostkit.lab.cli`: ``vhostkit lab check|run|clean``.

``labs/README.md`` documents the format with an annotated example.
"""
