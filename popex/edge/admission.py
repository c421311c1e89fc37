"""What a model may cost the edge before it is planned: the number of threshold configurations.

The strategy table is the Cartesian product of one threshold grid per
branch (each with "off"), once per head set, times the splits. That count
grows as ``12 ** n_branches``: a 6.9 KB spec with 7 branches asks for 36
million configurations and ends in ``MemoryError`` inside the sweep. The
count is computed here from the branch positions alone, before anything is
swept, and a model over the cap is refused with the number in the message
(:func:`check_plan_cost`); :class:`popex.edge.preparation.ModelPreparation`
calls it before the model enters the store and when a stored model is
planned at start.
"""

from __future__ import annotations

import math
from typing import Any

from popex.decision.policies import edge_threshold_grids
from popex.errors import CostError

__all__ = ["DEFAULT_MAX_CONFIGURATIONS", "n_plan_configurations", "check_plan_cost"]

#: Default cap: 4 branches with two expert head sets (3 x 12**4 = 62,208) plan; 5 branches do not.
DEFAULT_MAX_CONFIGURATIONS = 100_000


def n_plan_configurations(n_branches: int, *, n_heads: int = 1) -> int:
    """Threshold configurations the edge sweeps for a model: per head set, the product of (grid + "off").

    Parameters
    ----------
    n_branches : int
        Side branches of the model.
    n_heads : int
        Head sets (1 + the number of experts).

    Returns
    -------
    int

    Examples
    --------
    >>> n_plan_configurations(2), n_plan_configurations(7)
    (144, 35831808)
    """
    return n_heads * math.prod(len(grid) + 1 for grid in edge_threshold_grids(n_branches))


def check_plan_cost(model: Any, *, max_configurations: int) -> int:
    """Refuse a model whose plan would sweep more than ``max_configurations`` configurations.

    Parameters
    ----------
    model : StoredModel
        Validated, not yet planned.
    max_configurations : int
        The config's ``max_strategy_configurations``.

    Returns
    -------
    int
        Its configuration count.

    Raises
    ------
    CostError
        Naming the count, the branches and the cap.
    """
    n_branches = len(model.loaded.net.branch_after_stage)
    n_heads = 1 + len(model.expert_names)
    n_configurations = n_plan_configurations(n_branches, n_heads=n_heads)
    if n_configurations > max_configurations:
        raise CostError(f"model {model.name!r}: {n_branches} branches and {n_heads} head set(s) make "
                        f"{n_configurations:,} threshold configurations to plan; at most {max_configurations:,} "
                        "are taken (max_strategy_configurations): give it fewer branches")
    return n_configurations
