"""CPU package energy from RAPL counters under ``/sys/class/powercap``."""

from __future__ import annotations

import re
from pathlib import Path

from compressm_tune.hardware._energy_base import EnergyBackend, EnergyBackendError

__all__ = ["RaplBackend", "RAPL_ROOT"]

RAPL_ROOT = Path("/sys/class/powercap")
# Top-level package zones only ("intel-rapl:0"); sub-zones ("intel-rapl:0:0", core/dram)
# are contained in their package and would be double counted.
_PACKAGE_ZONE = re.compile(r"^intel-rapl:\d+$")


class RaplBackend(EnergyBackend):
    """Sum of the RAPL package counters (``energy_uj``), with wrap-around correction.

    Each counter wraps at its ``max_energy_range_uj``; one wrap per window is corrected.
    The counters cover the whole package, so work of other processes on a shared
    machine is counted too.

    Parameters
    ----------
    root : pathlib.Path
        The powercap directory; tests point it at a fake tree.

    Raises
    ------
    EnergyBackendError
        No package zone exists, or its counter is unreadable (the message says how to fix it).
    """

    method = "rapl"

    def __init__(self, root: Path = RAPL_ROOT) -> None:
        zones = sorted(p for p in Path(root).glob("intel-rapl:*") if _PACKAGE_ZONE.match(p.name))
        if not zones:
            raise EnergyBackendError(f"no RAPL package zone under {root} (not an Intel/AMD host?)")
        self._counters: list[tuple[Path, int]] = []
        for zone in zones:
            try:
                max_range_uj = int((zone / "max_energy_range_uj").read_text())
                int((zone / "energy_uj").read_text())
            except PermissionError as err:
                raise EnergyBackendError(
                    f"RAPL counter {zone / 'energy_uj'} is not readable; run "
                    "`sudo chmod a+r /sys/class/powercap/intel-rapl:*/energy_uj` or use the "
                    "CPU-time estimate (energy='estimate')"
                ) from err
            except (OSError, ValueError) as err:
                raise EnergyBackendError(f"cannot read RAPL zone {zone}: {err}") from err
            self._counters.append((zone / "energy_uj", max_range_uj))
        self.note = f"RAPL package counters ({len(zones)} zone(s)), whole package incl. other work"

    def _read_uj(self) -> list[int]:
        return [int(path.read_text()) for path, _ in self._counters]

    def begin(self) -> object:
        """Return the counter readings in microjoules."""
        return self._read_uj()

    def end(self, token: object) -> float | None:
        """Return the energy since ``token`` in millijoules, correcting one wrap per zone."""
        total_uj = 0
        for start_uj, now_uj, (_, max_range_uj) in zip(
            token, self._read_uj(), self._counters, strict=True  # type: ignore[arg-type]
        ):
            delta_uj = now_uj - start_uj
            if delta_uj < 0:  # the counter wrapped at max_energy_range_uj
                delta_uj += max_range_uj
            total_uj += delta_uj
        return total_uj / 1e3
