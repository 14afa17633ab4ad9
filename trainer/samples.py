"""What one training sample is, for every data source (no torch: the SFT packer imports it too).

``tokens``, ``labels`` (the next token of each position), ``loss_mask`` (1 where the label counts)
and ``position_ids``, each ``[seq_length]``; with several documents packed into one sequence also
``segment_ids`` (attention never crosses a segment; padding is a segment of its own).
"""

from __future__ import annotations

import numpy as np

Sample = dict[str, np.ndarray]
