"""Where the tests find the team's shared data (``../shared``: MGVQ fixtures made by the official code)."""

import os


def shared_dir() -> str:
    """The team's shared folder (MGVQ fixtures from the official code): $HTC_SHARED_DIR, else
    ../shared beside the checkout, else /work/shared (CI runs a clone elsewhere on this machine)."""
    candidates = [
        os.environ.get("HTC_SHARED_DIR", ""),
        os.path.join(os.path.dirname(__file__), "..", "..", "shared"),
        "/work/shared",
    ]
    return next((c for c in candidates if c and os.path.isdir(os.path.join(c, "mgvq"))), candidates[1])


MGVQ_DIR = os.path.join(shared_dir(), "mgvq")
MGVQ_FIXTURE = os.path.join(MGVQ_DIR, "mgvq_tiny_fixture.safetensors")  # f16 topology, 8 groups
MGVQ_FIXTURE_F8 = os.path.join(MGVQ_DIR, "mgvq_tiny_f8_g4_fixture.safetensors")  # f8 topology, 4 groups
MGVQ_MANIFEST = os.path.join(MGVQ_DIR, "mgvq_f16c32_g8_state_dict_shapes.json")
