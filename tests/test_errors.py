"""The error tree: every ApplianceError subclass, wherever it lives, is drawn in
appliance/errors.py's docstring where it sits, and each declares its own code; the DICOM
receiver picks a C-STORE status from the class, never from the message."""
from __future__ import annotations

import importlib
import pkgutil
import re

import pytest

import appliance
from appliance import errors
from appliance.errors import ApplianceError, InvalidDatasetError, OutOfSpaceError, StoreError, UnparsableDatasetError

# "  x StoreError   dicom_status 0x0110 ..." -> (indent, "StoreError", rest)
TREE_LINE = re.compile(r"^( *)[*x+\-·] (\w+)(.*)$")
CODE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")


def all_subclasses() -> set[type[ApplianceError]]:
    for module in pkgutil.walk_packages(appliance.__path__, "appliance."):
        importlib.import_module(module.name)
    found: set[type[ApplianceError]] = set()
    todo = [ApplianceError]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in found:
                found.add(sub)
                todo.append(sub)
    return found


def drawn_tree() -> dict[str, tuple[str | None, str]]:
    """name -> (parent drawn above it, rest of the line), from the docstring's tree."""
    doc = errors.__doc__ or ""
    tree: dict[str, tuple[str | None, str]] = {}
    stack: list[tuple[int, str]] = []
    for line in doc.splitlines():
        match = TREE_LINE.match(line)
        if not match:
            continue
        indent, name, rest = len(match.group(1)), match.group(2), match.group(3)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        assert name not in tree, f"{name} is drawn twice"
        tree[name] = (stack[-1][1] if stack else None, rest)
        stack.append((indent, name))
    return tree


def test_the_docstring_tree_is_the_class_tree():
    classes = all_subclasses()
    tree = drawn_tree()
    assert tree.pop("ApplianceError") == (None, "")
    by_name = {cls.__name__: cls for cls in classes}
    assert len(by_name) == len(classes), "two ApplianceError subclasses share a name"
    assert set(tree) == set(by_name), (f"not drawn: {sorted(set(by_name) - set(tree))}; "
                                       f"drawn but not defined: {sorted(set(tree) - set(by_name))}")
    for name, (parent, rest) in tree.items():
        cls = by_name[name]
        bases = [b for b in cls.__bases__ if issubclass(b, ApplianceError)]
        assert [b.__name__ for b in bases] == [parent], f"{name} is drawn under {parent}, derives from {bases}"
        if cls.__module__ != "appliance.errors":
            assert f"({cls.__module__})" in rest, f"{name}'s line must name its module {cls.__module__}"
        else:
            assert "(appliance." not in rest, f"{name} is defined in appliance.errors"


def test_every_error_declares_its_own_code_and_no_two_share_one():
    codes: dict[str, str] = {}
    for cls in sorted(all_subclasses() | {ApplianceError}, key=lambda c: c.__name__):
        assert "code" in vars(cls), f"{cls.__name__} declares no code of its own"
        code = vars(cls)["code"]
        assert isinstance(code, str) and CODE.match(code), f"{cls.__name__}.code = {code!r}"
        assert code not in codes, f"{cls.__name__} and {codes.get(code)} share the code {code!r}"
        codes[code] = cls.__name__


def test_store_errors_carry_their_c_store_status_and_the_tree_shows_it():
    tree = drawn_tree()
    for cls in all_subclasses() | {StoreError}:
        if not issubclass(cls, StoreError):
            continue
        assert "dicom_status" in vars(cls), f"{cls.__name__} ends as a C-STORE status but declares none"
        assert f"0x{cls.dicom_status:04X}" in tree[cls.__name__][1]


@pytest.mark.parametrize("exc, status", [
    # The message says one thing, the class another: the class wins.
    (InvalidDatasetError("cannot parse: but the identifiers are what is wrong"), 0xA900),
    (UnparsableDatasetError("missing SOPInstanceUID, says the message"), 0xC000),
    (OutOfSpaceError("cannot parse dataset"), 0xA700),
    (StoreError("cannot parse dataset"), 0x0110),
])
def test_the_receiver_maps_the_class_to_the_status_not_the_message(exc, status):
    from appliance.acquire.scp import store_failure

    assert store_failure(exc)[0] == status


def test_only_the_peer_s_own_mistakes_are_described_to_it():
    from appliance.acquire.scp import store_failure

    assert store_failure(InvalidDatasetError("missing StudyInstanceUID")) == (0xA900, "missing StudyInstanceUID")
    assert store_failure(StoreError("cannot write temp file: /var/lib/appliance/tmp/x: EIO")) \
        == (0x0110, "Storage failed (store_failed)")
    assert store_failure(OutOfSpaceError("free space 3 MiB below the floor of 500 MiB"))[1] \
        == "Out of resources: storage floor reached"
