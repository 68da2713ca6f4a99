"""What the operator asks of the Kubernetes API, derived from its source.

The chart's RBAC must grant exactly this. Rather than keep a second list by
hand, this module reads ``operator/src`` (test code left out) and finds the
API calls by their shape:

- ``Controller::new(X::<K>…)``, ``.owns(X::<K>…)``, ``.watches(X::<K>…)``:
  the controller lists and watches K;
- the fields of ``build::Resources`` (and the structs it nests): every built
  object, written by ``apply()`` with server-side apply, which is ``patch``,
  plus ``create`` when the object does not exist yet (the API server
  authorises that create separately);
- a generic helper over ``Api<K>`` (``fn delete<K>(…)`` in
  ``reconcile/apply.rs``, which reads an object before deleting it): the
  ``Api`` methods it calls, for every ``K`` it is called with as
  ``helper::<K>(…)`` (such helpers must be called with the turbofish);
- a variable, parameter or struct field of a concrete type ``Api<K>``: the
  ``Api`` methods called on it (``get_opt`` → get, ``replace`` → update,
  ``patch_status`` → patch on ``k/status``, ``patch_scale`` → patch on
  ``k/scale``, …) and the watch helpers it is
  given (``await_condition`` → list and watch);
- ``Recorder::new``: kube-runtime's event recorder (events.k8s.io/v1 Events:
  create, then patch for a repeated one — kube-runtime ``src/events.rs``);
- ``controller_owner_ref`` (owner references with ``blockOwnerDeletion``):
  update on the owner's ``finalizers`` subresource.

Kinds resolve through each file's ``use`` declarations to k8s-openapi's own
``impl Resource`` (group, plural, scope) in the version the workspace
enables, and ``MessagingCluster`` to the committed CRD. Where the code no
longer has the shape these rules expect, a check here fails loudly instead
of deriving less.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[3]
OPERATOR_SRC = ROOT / "operator" / "src"
CRD_PATH = ROOT / "charts" / "chorus" / "crds" / "messagingclusters.yaml"

# Where a permission is needed.
WORKLOAD = "workload"  # the watched namespace, or every namespace
LEASE = "lease"  # the operator's own namespace (leader election)
CLUSTER = "cluster"  # cluster-scoped objects

API_METHOD_VERBS = {
    "get": ("get",),
    "get_opt": ("get",),
    "get_metadata": ("get",),
    "get_metadata_opt": ("get",),
    "entry": ("get",),
    "list": ("list",),
    "list_metadata": ("list",),
    "watch": ("watch",),
    "watch_metadata": ("watch",),
    "create": ("create",),
    "replace": ("update",),
    "patch": ("patch",),
    "patch_metadata": ("patch",),
    "delete": ("delete",),
    "delete_collection": ("deletecollection",),
}
STATUS_METHOD_VERBS = {
    "get_status": ("get",),
    "patch_status": ("patch",),
    "replace_status": ("update",),
}
SCALE_METHOD_VERBS = {
    "get_scale": ("get",),
    "patch_scale": ("patch",),
    "replace_scale": ("update",),
}
WATCHING_HELPERS = ("await_condition", "watch_object", "watcher", "metadata_watcher")


@dataclass(frozen=True, order=True)
class Kind:
    group: str
    plural: str
    namespaced: bool
    name: str  # the Rust type / Kubernetes kind


@dataclass(frozen=True, order=True)
class Permission:
    scope: str  # WORKLOAD, LEASE or CLUSTER
    group: str
    resource: str  # plural, or plural/subresource
    verb: str
    # Only this object (known by name when the request is authorised), or
    # None: any object.
    object_name: str | None = None


# ---------------------------------------------------------------- Rust text


def _blank_strings_and_comments(src: str) -> str:
    """Comments and string/char literal contents become spaces (braces in
    format strings must not count), keeping offsets and line breaks."""
    out = list(src)
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j == -1 else j
            for k in range(i, j):
                out[k] = " "
            i = j
        elif src.startswith("/*", i):
            j = src.find("*/", i + 2)
            j = n if j == -1 else j + 2
            for k in range(i, j):
                if out[k] != "\n":
                    out[k] = " "
            i = j
        elif c == "r" and re.match(r'r#*"', src[i:]) and not (i and (src[i - 1].isalnum() or src[i - 1] == "_")):
            hashes = re.match(r"r(#*)\"", src[i:]).group(1)
            start = i + 2 + len(hashes)
            end = src.find('"' + hashes, start)
            end = n if end == -1 else end
            for k in range(start, end):
                if out[k] != "\n":
                    out[k] = " "
            i = end + 1 + len(hashes)
        elif c == '"':
            j = i + 1
            while j < n and src[j] != '"':
                j += 2 if src[j] == "\\" else 1
            for k in range(i + 1, min(j, n)):
                if out[k] != "\n":
                    out[k] = " "
            i = j + 1
        elif c == "'" and re.match(r"'(\\.|[^\\'])'", src[i:]):
            m = re.match(r"'(\\.|[^\\'])'", src[i:])
            for k in range(i + 1, i + m.end() - 1):
                out[k] = " "
            i += m.end()
        else:
            i += 1
    return "".join(out)


def _matching_brace(text: str, open_at: int) -> int:
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    raise ValueError("unbalanced braces")


def _strip_test_modules(text: str) -> str:
    """Removes inline ``#[cfg(test)] mod x { … }`` blocks."""
    while True:
        m = re.search(r"#\[cfg\(test\)\]\s*(?:#\[[^\]]*\]\s*)*(?:pub(?:\([^)]*\))?\s+)?mod\s+\w+\s*\{", text)
        if not m:
            return text
        end = _matching_brace(text, m.end() - 1)
        text = text[: m.start()] + " " * (end + 1 - m.start()) + text[end + 1 :]


def _test_only_files(path: Path, text: str) -> set[Path]:
    """Files of modules declared ``#[cfg(test)] mod x;`` in ``path``."""
    here = path.parent if path.name in ("lib.rs", "main.rs", "mod.rs") else path.with_suffix("")
    found = set()
    for name in re.findall(r"#\[cfg\(test\)\]\s*(?:pub(?:\([^)]*\))?\s+)?mod\s+(\w+)\s*;", text):
        found |= {here / f"{name}.rs", here / name / "mod.rs"}
    return found


@cache
def operator_sources() -> dict[Path, str]:
    """Non-test operator source, comments and string contents blanked."""
    raw = {p: p.read_text() for p in sorted(OPERATOR_SRC.rglob("*.rs"))}
    excluded: set[Path] = set()
    for path, text in raw.items():
        excluded |= _test_only_files(path, _blank_strings_and_comments(text))
    changed = True
    while changed:  # files under an excluded module directory too
        changed = False
        for path in raw:
            if path not in excluded and any(
                e.name == "mod.rs" and e.parent in path.parents for e in excluded
            ):
                excluded.add(path)
                changed = True
    return {
        p: _strip_test_modules(_blank_strings_and_comments(t))
        for p, t in raw.items()
        if p not in excluded
    }


def _split_top_level(text: str, sep: str = ",") -> list[str]:
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        if c in "{<(":
            depth += 1
        elif c in "}>)":
            depth -= 1
        elif c == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_use(tree: str, prefix: tuple[str, ...] = ()) -> list[tuple[str, tuple[str, ...]]]:
    tree = " ".join(tree.split())
    brace = tree.find("{")
    if brace == -1:
        alias = None
        if " as " in tree:
            tree, alias = (x.strip() for x in tree.split(" as "))
        parts = tuple(p.strip() for p in tree.split("::") if p.strip())
        path = prefix + parts
        if path[-1] == "self":
            path = path[:-1]
        return [(alias or path[-1], path)]
    head = tuple(p.strip() for p in tree[:brace].split("::") if p.strip())
    inner = tree[brace + 1 : _matching_brace(tree, brace)]
    out = []
    for item in _split_top_level(inner):
        out += _expand_use(item, prefix + head)
    return out


def imports(text: str) -> dict[str, tuple[str, ...]]:
    """Names brought into scope by ``use`` declarations, with their paths."""
    found = {}
    for m in re.finditer(r"\buse\s+([^;]+);", text):
        for name, path in _expand_use(m.group(1)):
            found[name] = path
    return found


def functions(text: str) -> list[str]:
    """Bodies (with signatures) of the functions in ``text``, outermost level
    of each ``fn``; nested closures stay inside their function."""
    bodies = []
    for m in re.finditer(r"\bfn\s+\w+", text):
        brace = text.find("{", m.end())
        semicolon = text.find(";", m.end())
        if brace == -1 or (semicolon != -1 and semicolon < brace and "where" not in text[m.end() : semicolon]):
            continue  # a declaration without a body
        bodies.append(text[m.start() : _matching_brace(text, brace) + 1])
    return bodies


# ------------------------------------------------------------ kind lookup


@cache
def cargo_metadata() -> dict:
    """``cargo metadata`` of the workspace (packages, resolved features)."""
    return json.loads(
        subprocess.run(
            ["cargo", "metadata", "--format-version", "1", "--locked"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )


def operator_version() -> str:
    (version,) = {p["version"] for p in cargo_metadata()["packages"] if p["name"] == "chorus-operator"}
    return version


@cache
def _k8s_openapi_dir() -> Path:
    meta = cargo_metadata()
    packages = [p for p in meta["packages"] if p["name"] == "k8s-openapi"]
    assert len(packages) == 1, f"one k8s-openapi in the workspace, found {[p['id'] for p in packages]}"
    (node,) = [n for n in meta["resolve"]["nodes"] if n["id"] == packages[0]["id"]]
    versions = [f for f in node["features"] if re.fullmatch(r"v1_\d+", f)]
    assert len(versions) == 1, f"one k8s-openapi version feature enabled, found {versions}"
    return Path(packages[0]["manifest_path"]).parent / "src" / versions[0]


@cache
def _crd() -> dict:
    return yaml.safe_load(CRD_PATH.read_text())


def resolve(name: str, file_imports: dict[str, tuple[str, ...]]) -> Kind | None:
    """The Kubernetes resource behind Rust type ``name``, or None when the
    name is not an API resource (a generic parameter, a spec type, …)."""
    path = file_imports.get(name)
    if path is None:
        return None
    if path[0] == "chorus_crds":
        crd = _crd()
        if name != crd["spec"]["names"]["kind"]:
            return None
        return Kind(crd["spec"]["group"], crd["spec"]["names"]["plural"], crd["spec"]["scope"] == "Namespaced", name)
    if path[0] != "k8s_openapi":
        return None
    module_dir = _k8s_openapi_dir().joinpath(*path[1:-1])
    for source in sorted(module_dir.glob("*.rs")):
        text = source.read_text()
        m = re.search(r"impl crate::Resource for " + re.escape(path[-1]) + r" \{(.*?)\n\}", text, re.S)
        if m:
            body = m.group(1)
            const = lambda key: re.search(key + r": &'static str = \"([^\"]*)\"", body).group(1)  # noqa: E731
            return Kind(const("GROUP"), const("URL_PATH_SEGMENT"), "NamespaceResourceScope" in body, const("KIND"))
    return None


# -------------------------------------------------------------- derivation


def _scope(kind: Kind, path: Path) -> str:
    if not kind.namespaced:
        return CLUSTER
    if path.name == "leader.rs":
        return LEASE
    return WORKLOAD


def _struct_fields(text: str, struct: str) -> list[str]:
    m = re.search(r"\bstruct\s+" + struct + r"\s*\{", text)
    assert m, f"struct {struct} not found"
    body = text[m.end() : _matching_brace(text, m.end() - 1)]
    return [f.split(":", 1)[1].strip() for f in _split_top_level(body) if ":" in f]


def _type_names(rust_type: str) -> list[str]:
    return re.findall(r"\b([A-Z]\w*)\b", rust_type)


def required_permissions(crd_name: str, lease_name: str) -> set[Permission]:
    """Every permission the operator's code needs. ``crd_name`` and
    ``lease_name`` name the single objects some calls are limited to."""
    sources = operator_sources()
    perms: set[Permission] = set()

    def need(kind: Kind, path: Path, verbs, sub: str = "", name: str | None = None):
        resource = kind.plural + (f"/{sub}" if sub else "")
        if not kind.namespaced and kind.plural == "customresourcedefinitions":
            name = crd_name
        for verb in verbs:
            perms.add(Permission(_scope(kind, path), kind.group, resource, verb, name))

    by_name = {p.relative_to(OPERATOR_SRC).as_posix(): (p, t) for p, t in sources.items()}

    # The controller's watches.
    for path, text in sources.items():
        uses = imports(text)
        for m in re.finditer(r"(?:Controller::new|\.owns|\.watches)\s*\(\s*[\w:]*?::<\s*(\w+)\s*>", text):
            kind = resolve(m.group(1), uses)
            assert kind, f"{path}: watched type {m.group(1)} is not an API resource"
            need(kind, path, ("list", "watch"))

    # Every built object is applied by server-side apply.
    build_path, build_text = by_name["build/mod.rs"]
    apply_path, apply_text = by_name["reconcile/apply.rs"]
    apply_fn = [f for f in functions(apply_text) if re.match(r"fn\s+apply\s*<", f)]
    assert apply_fn and "Patch::Apply" in apply_fn[0], "reconcile/apply.rs: apply() is no longer a server-side apply"
    assert re.search(r"let\s+Resources\s*\{[^}]*\}\s*=", apply_text) and ".." not in re.search(
        r"let\s+Resources\s*\{([^}]*)\}", apply_text
    ).group(1), "apply_all no longer destructures Resources without `..`"
    build_uses = imports(build_text)
    pending, seen = ["Resources"], set()
    while pending:
        struct = pending.pop()
        seen.add(struct)
        for field_type in _struct_fields(build_text, struct):
            for type_name in _type_names(field_type):
                kind = resolve(type_name, build_uses)
                if kind:
                    need(kind, apply_path, ("patch", "create"))
                elif re.search(r"\bstruct\s+" + type_name + r"\b", build_text) and type_name not in seen:
                    pending.append(type_name)

    # Functions and structs holding a concrete Api<K>.
    def calls(body: str, receiver: str = r"\w+") -> list[tuple[str, str]]:
        found = []
        for m in re.finditer(r"(?:" + receiver + r")\s*\.\s*(\w+)\s*\(", body):
            method = m.group(1)
            if method in API_METHOD_VERBS:
                found.append(("", method))
            elif method in STATUS_METHOD_VERBS:
                found.append(("status", method))
            elif method in SCALE_METHOD_VERBS:
                found.append(("scale", method))
        return found

    def record(kind: Kind, path: Path, found: list[tuple[str, str]], server_side_apply: bool):
        for sub, method in found:
            verbs = API_METHOD_VERBS.get(method) or STATUS_METHOD_VERBS.get(method) or SCALE_METHOD_VERBS[method]
            if method == "patch" and server_side_apply:
                verbs = verbs + ("create",)
            # A plain create is authorised before the object has a name.
            name = lease_name if _scope(kind, path) == LEASE and method != "create" else None
            need(kind, path, verbs, sub, name)

    for path, text in sources.items():
        uses = imports(text)
        # Variables (and parameters) bound to a concrete Api<K> in a function:
        # the Api methods called on them, and the watch helpers given them.
        for body in functions(text):
            bound = {
                var: kind
                for var, type_name in re.findall(r"\b(\w+)\s*:\s*&?\s*Api\s*<\s*(\w+)\s*>", body)
                + re.findall(r"\blet\s+(?:mut\s+)?(\w+)\s*=\s*Api::<\s*(\w+)\s*>", body)
                if (kind := resolve(type_name, uses))
            }
            mentioned = {k for t in re.findall(r"\bApi\s*(?:::)?<\s*(\w+)\s*>", body) if (k := resolve(t, uses))}
            assert mentioned <= set(bound.values()), (
                f"{path}: a concrete Api of {sorted(k.name for k in mentioned - set(bound.values()))} is used "
                "without a variable; the derivation cannot tell which calls go through it"
            )
            for var, kind in bound.items():
                record(kind, path, calls(body, r"\b" + var), "Patch::Apply" in body)
                if any(re.search(r"\b" + h + r"\s*\(\s*&?" + var + r"\b", body) for h in WATCHING_HELPERS):
                    need(kind, path, ("list", "watch"))
        # Struct fields of a concrete Api<K>: the calls on self.<field>.
        for struct in re.finditer(r"\bstruct\s+\w+\s*(?:<[^>{]*>)?\s*\{", text):
            fields = text[struct.end() : _matching_brace(text, struct.end() - 1)]
            for field, type_name in re.findall(r"\b(\w+)\s*:\s*Api\s*<\s*(\w+)\s*>", fields):
                kind = resolve(type_name, uses)
                if kind:
                    record(kind, path, calls(text, r"self\s*\.\s*" + field), "Patch::Apply" in text)

    # Generic helpers over Api<K>: their calls, for each K they are called
    # with. `apply` is the one exception: it writes the built objects,
    # derived above from build::Resources.
    helpers: dict[str, tuple[list[tuple[str, str]], bool]] = {}
    for path, text in sources.items():
        for body in functions(text):
            m = re.match(r"fn\s+(\w+)\s*<\s*(\w+)\b", body)
            if not m or m.group(1) == "apply":
                continue
            name, param = m.groups()
            apis = re.findall(r"\b(\w+)\s*:\s*&?\s*Api\s*<\s*" + param + r"\s*>", body)
            found = [c for var in apis for c in calls(body, r"\b" + var)]
            if found:
                helpers[name] = (found, "Patch::Apply" in body)
    assert "delete" in helpers, "reconcile/apply.rs: delete::<K>() no longer calls the API through an Api<K>"
    for path, text in sources.items():
        uses = imports(text)
        for name, (found, server_side_apply) in helpers.items():
            bare = [m for m in re.finditer(r"(?<![.\w])" + name + r"\s*\(", text)]
            assert not bare, f"{path}: call {name}::<K>(…) with the turbofish, so the RBAC derivation sees K"
            for m in re.finditer(r"\b" + name + r"::<\s*(\w+)\s*>", text):
                kind = resolve(m.group(1), uses)
                assert kind, f"{path}: {name}::<{m.group(1)}> is not an API resource"
                record(kind, path, found, server_side_apply)

    # kube-runtime's Recorder: events.k8s.io/v1 Events, created, then patched
    # when the same event repeats.
    if any(re.search(r"\bRecorder::new\s*\(", t) for t in sources.values()):
        perms |= {Permission(WORKLOAD, "events.k8s.io", "events", v) for v in ("create", "patch")}

    # Controller owner references carry blockOwnerDeletion: true, which needs
    # update on the owner's finalizers where OwnerReferencesPermissionEnforcement runs.
    for path, text in sources.items():
        for m in re.finditer(r"\b(\w+)\s*\.\s*controller_owner_ref\s*\(", text):
            crd = _crd()
            owner = Kind(crd["spec"]["group"], crd["spec"]["names"]["plural"], True, crd["spec"]["names"]["kind"])
            need(owner, path, ("update",), "finalizers")
    return perms
