import faulthandler
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
faulthandler.enable()

from tests.slurm_cluster import slurm  # noqa: E402,F401  (session fixture: a real single-node Slurm)
