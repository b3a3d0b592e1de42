"""Write an operator root and one intermediate CA per control plane.

    python examples/deploy/operator_ca.py ca/ a b

gives ``ca/root.pem`` + ``ca/root.key`` (keep the key offline) and, per control plane,
``ca/a.pem`` (its intermediate, then the root) + ``ca/a.key``: that control plane's
``AGENTMESH_CA_CERT_FILE`` and ``AGENTMESH_CA_KEY_FILE``. See docs/deploy.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

from agentmesh.control.operator_ca import write_operator_ca


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    directory, planes = Path(argv[0]), argv[1:]
    trust_domain = "agentmesh.local"
    for name, (cert, key) in write_operator_ca(directory, trust_domain, planes).items():
        print(f"{name}: AGENTMESH_CA_CERT_FILE={cert} AGENTMESH_CA_KEY_FILE={key}")
    print(f"root: {directory / 'root.pem'} (keep {directory / 'root.key'} offline)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
