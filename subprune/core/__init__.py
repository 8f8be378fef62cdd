"""The one pipeline every architecture goes through: per-site selection -> refit -> surgery, planning.

Rooms of the package:

* ``subprune.core``: what is the same for every model: one site's step
  (:func:`subprune.core.site.prune_site`) and the plan of units per site
  (:mod:`subprune.core.plan`). The statistics (:mod:`subprune.statistics`),
  the solver (:mod:`subprune.solver`, :mod:`subprune.solver_factored`) and
  the methods' selection functions (:mod:`subprune.methods`,
  :mod:`subprune.hf.baselines`) are the other shared rooms.
* adapters: where the sites are and how one is cut: torch.fx graphs
  (:mod:`subprune.sites`, :mod:`subprune.surgery`, the adapter
  :class:`subprune.graph_adapter.GraphSiteAdapter`) and Hugging Face transformers
  (:mod:`subprune.hf.architectures`, :class:`subprune.hf.adapter.TransformerSiteAdapter`).
* drivers: the order in which sites are visited and where their statistics
  come from: :func:`subprune.prune` for fx graphs, the block engine
  (:mod:`subprune.hf.engine`) for models made of blocks.
"""

from subprune.core.site import (
    ConsumerPart,
    SiteAdapter,
    SiteOptions,
    SiteReport,
    SiteSolution,
    SiteSystem,
    prune_site,
    solve_site,
)

__all__ = ["ConsumerPart", "SiteAdapter", "SiteOptions", "SiteReport", "SiteSolution", "SiteSystem", "prune_site",
           "solve_site"]
