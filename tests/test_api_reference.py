"""The API reference shows every argument's type and each class's members.

`docs/reference.md` renders the public API with mkdocstrings (its options in
mkdocs.yml): the Type column of a Parameters or Returns table comes from the
signature's annotations (Keras-style docstrings give types in words), and a
class shows the members its `:::` directive names. Both are read here
statically with griffe, as mkdocstrings reads them: no site build, no layer.
"""

import pathlib
import textwrap

import griffe
import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "reference.md"
PACKAGE = "keras_ext_embedding"
# What users call on a layer, each layer showing its own or `Embedding`'s.
LAYER_MEMBERS = [
    "embeddings",
    "traced_invalid_ids",
    "enable_lora",
    "merge_lora",
    "quantize",
]
LAYERS = ["Embedding", "ReversibleEmbedding", "EmbeddingBag", "SharedEmbedding"]


def handler_options():
    """The python handler's options of mkdocs.yml, as the site uses them."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    for plugin in config["plugins"]:
        if isinstance(plugin, dict) and "mkdocstrings" in plugin:
            return plugin["mkdocstrings"]["handlers"]["python"]["options"]
    raise AssertionError("mkdocs.yml configures no mkdocstrings plugin")


def directives():
    """`{object path: its options}` for each `::: object` of the page."""
    found = {}
    lines = REFERENCE.read_text().splitlines()
    for index, line in enumerate(lines):
        if not line.startswith(":::"):
            continue
        block = []
        for following in lines[index + 1 :]:
            if not following.startswith(" "):
                break
            block.append(following)
        options = yaml.safe_load(textwrap.dedent("\n".join(block))) or {}
        found[line[3:].strip()] = options.get("options", {})
    return found


OPTIONS = handler_options()
DIRECTIVES = directives()
API = griffe.load(
    PACKAGE,
    search_paths=[str(ROOT)],
    docstring_parser=OPTIONS["docstring_style"],
    docstring_options=OPTIONS.get("docstring_options", {}),
)


def documented_signatures():
    """`(name, signature, docstring owner)` for each signature of the page: a
    class's `__init__` (its arguments are documented in the class docstring,
    `merge_init_into_class`), each method it lists, each function."""
    found = []
    for path in DIRECTIVES:
        obj = API[path.removeprefix(f"{PACKAGE}.")]
        name = obj.name
        if obj.is_function:
            found.append((name, obj, obj))
            continue
        if "__init__" in obj.members:
            found.append((name, obj.members["__init__"], obj))
        for member in DIRECTIVES[path].get("members") or []:
            function = obj.all_members.get(member)
            if function is not None and function.is_function:
                found.append((f"{name}.{member}", function, function))
    return found


SIGNATURES = documented_signatures()


def signature_names(function):
    return [p.name for p in function.parameters if p.name not in ("self", "cls")]


def docstring_sections(owner, kind):
    return [
        section
        for section in owner.docstring.parse()
        if section.kind is griffe.DocstringSectionKind[kind]
    ]


def test_the_page_documents_the_public_api():
    public = {f"{PACKAGE}.{name}" for name in API.exports if name != "__version__"}
    assert set(DIRECTIVES) == public


def test_the_page_documents_signatures():
    # A parsing slip here would leave the tests below nothing to check.
    names = {name for name, _, _ in SIGNATURES}
    assert {
        *LAYERS,
        "Embedding.enable_lora",
        "ReversibleEmbedding.quantize",
        "SharedEmbedding.merge_lora",
        "replace_embeddings",
        "shard_embeddings",
    } <= names


@pytest.mark.parametrize(
    ("name", "function", "owner"), SIGNATURES, ids=[s[0] for s in SIGNATURES]
)
def test_every_parameter_is_annotated(name, function, owner):
    # `**kwargs` too: the Type column has a row for it.
    missing = [p.name for p in function.parameters if p.annotation is None]
    missing = [p for p in missing if p not in ("self", "cls")]
    assert not missing, f"{name}: parameters without a type annotation: {missing}"


@pytest.mark.parametrize(
    ("name", "function", "owner"), SIGNATURES, ids=[s[0] for s in SIGNATURES]
)
def test_the_args_section_documents_the_parameters(name, function, owner):
    documented = [
        parameter.name.lstrip("*")
        for section in docstring_sections(owner, "parameters")
        for parameter in section.value
    ]
    expected = signature_names(function)
    unknown = [p for p in documented if p not in expected]
    assert not unknown, f"{name}: Args names what is no parameter: {unknown}"
    undocumented = [p for p in expected if p not in documented]
    assert not undocumented, f"{name}: parameters missing from Args: {undocumented}"


@pytest.mark.parametrize(
    ("name", "function", "owner"), SIGNATURES, ids=[s[0] for s in SIGNATURES]
)
def test_every_row_of_the_type_column_is_filled(name, function, owner):
    rows = [
        (section.kind.value, getattr(item, "name", ""), item.annotation)
        for kind in ("parameters", "returns")
        for section in docstring_sections(owner, kind)
        for item in section.value
    ]
    empty = [(kind, row) for kind, row, annotation in rows if annotation is None]
    assert not empty, f"{name}: rows with an empty Type column: {empty}"


@pytest.mark.parametrize("layer", LAYERS)
def test_each_layer_lists_the_members_users_call(layer):
    options = DIRECTIVES[f"{PACKAGE}.{layer}"]
    assert options.get("members") == LAYER_MEMBERS
    cls = API[layer]
    inherited = options.get("inherited_members", False)
    for member in options["members"]:
        assert member in cls.all_members, f"{layer} has no member {member!r}"
        if member not in cls.members:
            # Without `inherited_members`, mkdocstrings drops it silently.
            assert inherited is True or member in (inherited or []), (
                f"{layer}.{member} is inherited: the page shows it only with "
                "`inherited_members`"
            )
