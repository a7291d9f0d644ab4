"""Services register themselves through entry points; the runtime finds, orders and checks them."""

from __future__ import annotations

import importlib.util
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import typer

from libs.eventbus.migrate import migration_dirs
from libs.runtime import cli
from libs.runtime.registry import (
    ENTRY_POINT_GROUP,
    RegistrationError,
    ServiceRegistration,
    discover,
    load,
    resolve_ref,
    start_order,
)

pytestmark = pytest.mark.unit

# What the entry points below resolve to (load() imports this module by name).
NOT_A_REGISTRATION = object()
ALPHA = ServiceRegistration(name="alpha", module="pkg.alpha")
BETA = ServiceRegistration(name="beta", module="pkg.beta", after=("alpha",))

SERVICE_NAMES = {
    "gateway",
    "workflow-engine",
    "policy-admission",
    "incident",
    "cost",
    "audit-replay",
}


def _reg(name: str, *after: str) -> ServiceRegistration:
    return ServiceRegistration(name=name, module=f"pkg.{name}", after=after)


def _names(regs: tuple[ServiceRegistration, ...]) -> list[str]:
    return [r.name for r in regs]


def _entry(name: str, attr: str) -> EntryPoint:
    return EntryPoint(name=name, value=f"{__name__}:{attr}", group=ENTRY_POINT_GROUP)


# --- ordering -------------------------------------------------------------------------------------


def test_services_start_after_what_they_depend_on_and_otherwise_in_name_order() -> None:
    regs = [_reg("web", "db", "queue"), _reg("queue"), _reg("db"), _reg("worker", "queue")]
    assert _names(start_order(regs)) == ["db", "queue", "web", "worker"]
    # Whatever order they were found in.
    assert _names(start_order(reversed(regs))) == ["db", "queue", "web", "worker"]


def test_a_dependency_on_an_unregistered_service_is_refused() -> None:
    with pytest.raises(RegistrationError, match="'web' starts after db, which is not registered"):
        start_order([_reg("web", "db")])


def test_a_dependency_cycle_is_refused_naming_it() -> None:
    with pytest.raises(RegistrationError, match=r"cycle: (a -> b -> a|b -> a -> b)"):
        start_order([_reg("a", "b"), _reg("b", "a"), _reg("c")])


def test_two_services_of_one_name_are_refused() -> None:
    with pytest.raises(RegistrationError, match="two services are registered as 'a'"):
        start_order([_reg("a"), _reg("a")])


# --- loading entry points -------------------------------------------------------------------------


def test_entry_points_load_in_start_order() -> None:
    assert load([_entry("beta", "BETA"), _entry("alpha", "ALPHA")]) == (ALPHA, BETA)


def test_an_entry_point_that_is_not_a_registration_is_refused() -> None:
    with pytest.raises(RegistrationError, match="is a object, not a ServiceRegistration"):
        load([_entry("odd", "NOT_A_REGISTRATION")])


def test_an_entry_point_must_carry_its_services_name() -> None:
    with pytest.raises(RegistrationError, match="'other' registers a service named 'alpha'"):
        load([_entry("other", "ALPHA")])


def test_a_broken_entry_point_is_reported_with_its_target() -> None:
    with pytest.raises(RegistrationError, match="MISSING"):
        load([_entry("missing", "MISSING")])


def test_references_resolve_or_fail_clearly() -> None:
    assert resolve_ref(f"{__name__}:ALPHA") is ALPHA
    with pytest.raises(RegistrationError, match=r"cannot load 'nowhere\.at_all:x'"):
        resolve_ref("nowhere.at_all:x")


# --- the installed services -----------------------------------------------------------------------


def test_the_six_services_are_installed_and_the_gateway_starts_last() -> None:
    regs = discover()
    assert set(_names(regs)) == SERVICE_NAMES
    # The front door forwards to every other service: it is spawned after all of them.
    assert regs[-1].name == "gateway"
    assert set(regs[-1].after) == SERVICE_NAMES - {"gateway"}


def test_every_installed_service_is_runnable_and_its_references_resolve() -> None:
    for reg in discover():
        assert importlib.util.find_spec(f"{reg.module}.__main__") is not None, reg.name
        if reg.migrations is not None:
            assert sorted(reg.migrations.glob("*.sql")), reg.name
        if reg.demo is not None:
            assert callable(resolve_ref(reg.demo)), reg.name
        for name, ref in reg.commands.items():
            assert isinstance(resolve_ref(ref), typer.Typer), (reg.name, name)


def test_migration_ids_keep_their_historic_prefixes() -> None:
    # Ids already recorded in databases: a renamed prefix would re-apply a migration.
    assert [component for component, _ in migration_dirs()] == [
        "eventstore",
        "audit_replay",
        "cost",
        "gateway",
        "incident",
        "policy_admission",
        "workflow_engine",
    ]


def test_two_services_shipping_migrations_under_one_prefix_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "gateway" / "migrations"
    folder.mkdir(parents=True)
    copy = ServiceRegistration(name="copy", module="pkg.copy", migrations=folder)
    with pytest.raises(RegistrationError, match="both ship migrations as 'gateway'"):
        migration_dirs([*discover(), copy])


def test_the_cli_mounts_the_commands_services_contribute() -> None:
    groups = {g.name: g.typer_instance for g in cli.app.registered_groups}
    assert "tenant" in groups
    assert groups["tenant"] is resolve_ref("services.gateway.cli:tenant_app")


def test_a_contributed_command_cannot_replace_a_built_in_one() -> None:
    target = typer.Typer()

    @target.command()
    def status() -> None:
        """A built-in command."""

    clash = ServiceRegistration(
        name="x", module="pkg.x", commands={"status": "services.gateway.cli:tenant_app"}
    )
    with pytest.raises(cli.CliError, match="adds `mctl status`, which exists already"):
        cli.mount_commands(target, (clash,))


def test_every_service_package_and_migrations_folder_in_the_tree_is_registered() -> None:
    # Before entry points the runtime scanned services/; a package or migrations folder added
    # without a registration would now be silently left out of `mctl up` and `mctl migrate`.
    root = Path(__file__).resolve().parents[2] / "services"
    runnable = {f"services.{p.parent.name}" for p in root.glob("*/__main__.py")}
    folders = {p.resolve() for p in root.glob("*/migrations") if p.is_dir()}
    assert runnable == {r.module for r in discover()}
    assert folders == {r.migrations.resolve() for r in discover() if r.migrations is not None}
