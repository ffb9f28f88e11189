"""A ``sites`` filter checked against the sites the model actually calls (prober and callback)."""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

from actpat.recorder.hooks import site_filter

_GLOB = set("*?[")


class SiteSelectionError(ValueError):
    """A ``sites`` filter, or a model, that selects no activation site, or names one that does not exist."""


class SiteSelection:
    """The user's ``sites`` filter that remembers every site name it was asked about.

    The recorder's hooks ask the filter once per site name, in call order, whether or not the name is
    selected, so after one forward :attr:`seen` lists every site of the model that ran. :meth:`check`
    turns a filter that selects nothing, or a literal name that is not a site, into an error that lists
    the sites that exist.
    """

    def __init__(self, sites: Union[None, str, Sequence[str], Callable[[str], bool]]) -> None:
        self._selected = site_filter(sites)  # validates the type
        names = [sites] if isinstance(sites, str) else [] if sites is None or callable(sites) else list(sites)
        self.sites = sites
        self.literal = tuple(name for name in names if not _GLOB & set(name))
        self.seen: dict[str, bool] = {}

    def __call__(self, name: str) -> bool:
        selected = self.seen.get(name)
        if selected is None:
            selected = self.seen[name] = bool(self._selected(name))
        return selected

    def check(self, where: str, warn: Optional[Callable[[str, str], None]] = None) -> None:
        """Raise unless the forwards seen so far (during ``where``) called every named and some selected site;
        ``warn(key, message)`` where names or patterns select some calls of a site but not its others."""
        error = self.problem(where)
        if error is not None:
            raise error
        partial = self.partial()
        if warn is not None and partial:
            shown = "; ".join(f"{chosen[0]} but not {', '.join(left[:3])}{', ...' if len(left) > 3 else ''}"
                              for chosen, left in partial[:3])
            warn(
                "sites:partial",
                f"actpat: `sites={self.sites!r}` selects some calls of a site but not its others ({shown}"
                f"{'; ...' if len(partial) > 3 else ''}): a module called more than once in a forward (torchvision's "
                "BasicBlock calls its `relu` twice) records its k-th further call as `name#k`, and a function called "
                "in a forward is `path:relu#k`. To record every call, let the pattern match the suffix "
                "(`layer*.relu*`); to leave calls out on purpose, pass a predicate (`sites=lambda name: ...`).",
            )

    def partial(self) -> list[tuple[list[str], list[str]]]:
        """The calls of one site (a module's, or a function's in one forward: names that differ by their ``#k``)
        that names or patterns select in part, as (selected, not selected) name lists; none for a predicate."""
        if callable(self.sites):
            return []
        calls: dict[str, tuple[list[str], list[str]]] = {}
        for name, selected in self.seen.items():
            calls.setdefault(name.split("#")[0], ([], []))[0 if selected else 1].append(name)
        return [(chosen, left) for chosen, left in calls.values() if chosen and left]

    def problem(self, where: str) -> Optional[SiteSelectionError]:
        """The error :meth:`check` would raise, or None: a failure's clearest explanation when sites ran."""
        if not self.seen:
            return SiteSelectionError(
                f"Expected the model to call at least one activation site, but none ran inside a module forward "
                f"during {where}. Name other activation classes with `module_types=`; if the probe ran no forward of "
                "the module, pass your own probe forward (`probe_forward=` of the callback, `forward=` of the "
                "Prober)."
            )
        existing = list(self.seen)
        missing = [name for name in self.literal if name not in self.seen]
        if missing:
            return SiteSelectionError(
                f"Expected every name in `sites` to be an activation site of the model, but {missing} "
                f"{'is' if len(missing) == 1 else 'are'} not. The sites called during {where}: {existing}."
            )
        if not any(self.seen.values()):
            return SiteSelectionError(
                f"Expected `sites={self.sites!r}` to select at least one activation site, but it matches none of "
                f"the sites called during {where}: {existing}. Pass names or glob patterns from this list."
            )
        return None
