"""``ray start`` for a node joining a loopback-only head on this host (used by ``services``).

Ray rewrites a ``127.0.0.1`` head address to the host's outward IP, where a head started on
loopback does not listen; this entry point keeps the address as given, then runs Ray's own
``ray start`` command line unchanged.

    python -m deployments.ray_node start --address 127.0.0.1:6380 --num-cpus 1 --block
"""

import sys

import ray._private.services
from ray.scripts.scripts import main

ray._private.services.resolve_ip_for_localhost = lambda host: host

if __name__ == "__main__":
    sys.exit(main())
