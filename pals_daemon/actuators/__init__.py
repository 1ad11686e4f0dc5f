"""One actuator per hardware knob (power limit, locked SM clock): read, apply, record original, restore."""

from pals_daemon.actuators.base import Actuator, ActuatorHost
from pals_daemon.actuators.clock import LockedClockActuator
from pals_daemon.actuators.power import PowerLimitActuator

__all__ = ["Actuator", "ActuatorHost", "LockedClockActuator", "PowerLimitActuator", "all_actuators"]


def all_actuators(clocks_enabled: bool = True) -> list[Actuator]:
    """Every knob, in apply order: the power limit first (it is the hard bound on power), then the clock."""
    return [PowerLimitActuator(), LockedClockActuator(enabled=clocks_enabled)]
