"""``@capability``: a plain Python function becomes a mesh capability.

The decorator reads everything the mesh needs from what the user already wrote: the name from
the function, the description from the docstring, the input schema from the signature and the
output schema from the return annotation. Everything is computed once, at decoration time, for
two reasons: a mistake in a signature fails when the module is imported (not on the first call
in production), and the request path is left with one pydantic validation for the input and one
validate-and-dump for the output.
"""

from __future__ import annotations

import collections.abc
import contextlib
import functools
import inspect
import json
import math
import re
import types
import typing
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from typing import Annotated, Any, Generic, ParamSpec, TypeVar, overload

import anyio.to_thread
from packaging.version import InvalidVersion, Version
from pydantic import BaseModel, ConfigDict, Field, PydanticUserError, TypeAdapter, ValidationError
from pydantic import create_model as _create_model
from pydantic.fields import FieldInfo
from pydantic_core import PydanticSerializationError

from agentmesh.errors import ConfigurationError, InvalidInput, InvalidOutput
from agentmesh.models import CAPABILITY_NAME_PATTERN, CapabilitySpec

__all__ = ["Capability", "capability", "is_capability"]

P = ParamSpec("P")
R = TypeVar("R")

_NAME_RE = re.compile(CAPABILITY_NAME_PATTERN)
_MAX_NAME = 128
_STREAM_TYPES = (
    collections.abc.AsyncIterator,
    collections.abc.AsyncIterable,
    collections.abc.AsyncGenerator,
)
_INPUT_CONFIG = ConfigDict(extra="forbid", protected_namespaces=())
#: Failing fields named in an InvalidInput/InvalidOutput message (the ``errors`` list has all):
#: enough for any hand-written call, while a 10,000-item payload does not make a 1 MB message.
_MAX_LISTED = 20


class Capability(Generic[P, R]):
    """A function offered to the mesh, with its spec and its precomputed validators.

    Calling the object calls the original function unchanged, so capabilities stay easy to unit
    test. The agent runtime uses the other methods: :meth:`parse_input` on the request body,
    then :meth:`invoke` and :meth:`dump_output`, or :meth:`stream` for async generators.

    ``injected`` maps the parameters the runtime supplies itself (not the caller) to their type.
    Today that is a parameter annotated with :class:`agentmesh.mesh.Mesh` (or ``Mesh | None``):
    it is left out of the input schema, and the runtime passes the agent's own mesh handle
    through ``injected={"mesh": mesh}``, so that a capability calls other capabilities through
    its agent's sidecar (with its identity, policies, deadline and trace context).
    """

    spec: CapabilitySpec
    fn: Callable[P, R]
    name: str
    streaming: bool
    injected: dict[str, type]
    # Set by functools.update_wrapper, declared so that type checkers know them.
    __name__: str
    __wrapped__: Callable[P, R]

    def __init__(
        self,
        fn: Callable[P, R],
        *,
        name: str | None = None,
        version: str = "0.1.0",
        description: str | None = None,
        tags: Sequence[str] = (),
        idempotent: bool = False,
        timeout: float | None = None,
    ) -> None:
        from agentmesh.mesh import Mesh

        if isinstance(fn, Capability):  # decorated twice: the latest options win
            fn = fn.fn
        functools.update_wrapper(self, fn)
        cap_name = name if name is not None else getattr(fn, "__name__", "")
        if not _NAME_RE.match(cap_name) or len(cap_name) > _MAX_NAME:
            raise ConfigurationError(
                f"capability {_qualname(fn)!r}: name {cap_name!r} is not a valid capability name; "
                f"use a Python identifier, optionally dotted (e.g. nlp.summarize), at most "
                f"{_MAX_NAME} characters, or pass name=..."
            )
        where = f"capability {cap_name!r}"
        _check_options(where, version, tags, timeout)
        if inspect.isgeneratorfunction(fn):
            raise ConfigurationError(
                f"{where}: {_qualname(fn)} is a generator function; "
                "use an async generator for streaming (async def ... yield)"
            )
        streaming = inspect.isasyncgenfunction(fn)
        try:
            signature = inspect.signature(fn)
            hints = typing.get_type_hints(fn, include_extras=True)
        except (NameError, TypeError, ValueError) as exc:
            raise ConfigurationError(
                f"{where}: cannot read the signature and type annotations of {_qualname(fn)}: "
                f"{exc}; define or import the annotated types at module level"
            ) from exc
        summary, param_docs = _parse_docstring(fn.__doc__)

        definitions: dict[str, Any] = {}
        annotations: dict[str, Any] = {}
        renamed: list[tuple[str, str]] = []
        injected: dict[str, type] = {}
        for param in signature.parameters.values():
            annotation = _check_parameter(where, param, hints)
            if _asks_for(annotation, Mesh):
                injected[param.name] = Mesh
                continue
            annotations[param.name] = annotation
            default = ... if param.default is inspect.Parameter.empty else param.default
            field: dict[str, Any] = {}
            doc = param_docs.get(param.name)
            if doc is not None and not _has_description(annotation, default):
                field["description"] = doc
            key = param.name
            if key.startswith("_") or hasattr(BaseModel, key):
                # ``schema``, ``json``, ``model_config``, ``_private`` would shadow BaseModel or
                # be taken for private attributes: such a field gets another name, and keeps the
                # parameter's as its alias (all that callers and schemas see).
                key = "f_" + key
                while key in signature.parameters or key in definitions:
                    key += "_"
                field["alias"] = param.name
                renamed.append((key, param.name))
            definitions[key] = (
                Annotated[annotation, Field(**field)] if field else annotation,
                default,
            )
        try:
            model: type[BaseModel] = _create_model(
                _model_name(cap_name),
                __config__=_INPUT_CONFIG,
                __module__=getattr(fn, "__module__", __name__),
                **definitions,
            )
            input_schema = model.model_json_schema()
        except PydanticUserError as exc:
            raise ConfigurationError(
                f"{where}: {_unsupported_parameter(annotations, exc)}"
            ) from exc

        item_type = _output_type(where, hints.get("return", Any), streaming)
        try:
            adapter: TypeAdapter[Any] = TypeAdapter(item_type)
            output_schema = adapter.json_schema(mode="serialization")
        except PydanticUserError as exc:
            raise ConfigurationError(
                f"{where}: return annotation {item_type!r} cannot be described as JSON: {exc}"
            ) from exc

        try:
            self.spec = CapabilitySpec(
                name=cap_name,
                version=version,
                description=summary if description is None else description,
                input_schema=input_schema,
                output_schema=output_schema,
                tags=tuple(tags),
                idempotent=idempotent,
                streaming=streaming,
                timeout=timeout,
            )
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in exc.errors()
            )
            raise ConfigurationError(f"{where}: {problems}") from exc
        self.fn = fn
        self.name = cap_name
        self.streaming = streaming
        self.injected = injected
        self._call: Callable[..., Any] = fn
        self._is_async = inspect.iscoroutinefunction(fn)
        self._validate_input = model.__pydantic_validator__.validate_json
        self._renamed = tuple(renamed)
        self._validate_output = adapter.validator.validate_python
        self._serialize_output = adapter.serializer.to_json
        self._output_model = (
            item_type if inspect.isclass(item_type) and issubclass(item_type, BaseModel) else None
        )

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<Capability {self.name!r} version {self.spec.version!r}>"

    def parse_input(self, body: bytes) -> dict[str, Any]:
        """Validate a JSON request body; return the keyword arguments for the function.

        An empty body means ``{}``. Nested models stay model instances.

        Raises:
            InvalidInput: the body is not JSON, or does not match the input schema; ``errors``
                holds pydantic's error list.
        """
        try:
            values: dict[str, Any] = self._validate_input(body or b"{}").__dict__
        except ValidationError as exc:
            raise InvalidInput(
                f"invalid input for capability {self.name!r}: {_describe(exc, 'body')}",
                errors=json.loads(exc.json(include_url=False)),
            ) from exc
        # The model instance is dropped here, so its __dict__ is handed over without a copy.
        for key, name in self._renamed:
            values[name] = values.pop(key)
        return values

    async def invoke(
        self, arguments: Mapping[str, Any], injected: Mapping[str, Any] | None = None
    ) -> Any:
        """Run the function and return its raw result.

        A sync function runs in a worker thread, so that it never blocks the event loop; if the
        caller is cancelled (a deadline), the call returns at once and the thread's result is
        dropped. ``injected`` holds values for :attr:`injected` parameters, by parameter name;
        names the function does not declare are ignored.
        """
        if self.streaming:
            raise ConfigurationError(
                f"capability {self.name!r} streams; use stream(), not invoke()"
            )
        kwargs = self._arguments(arguments, injected)
        if self._is_async:
            return await self._call(**kwargs)
        return await anyio.to_thread.run_sync(
            functools.partial(self._call, **kwargs), abandon_on_cancel=True
        )

    def dump_output(self, result: Any) -> bytes:
        """Validate a result against the return annotation and serialise it to JSON.

        Raises:
            InvalidOutput: the result does not match the annotation, or is not serialisable.
        """
        return self._dump(result, "returned invalid output")

    def stream(
        self, arguments: Mapping[str, Any], injected: Mapping[str, Any] | None = None
    ) -> AsyncGenerator[bytes, None]:
        """Run an async-generator capability; yield each item validated and dumped to JSON.

        Closing the returned iterator closes the capability's generator.

        Raises:
            InvalidOutput: (while iterating) an item does not match the item type.
        """
        if not self.streaming:
            raise ConfigurationError(
                f"capability {self.name!r} does not stream; use invoke(), not stream()"
            )
        return self._stream(self._call(**self._arguments(arguments, injected)))

    async def _stream(self, items: AsyncGenerator[Any, Any]) -> AsyncGenerator[bytes, None]:
        async with contextlib.aclosing(items):
            async for item in items:
                yield self._dump(item, "yielded an invalid item")

    def _arguments(
        self, arguments: Mapping[str, Any], injected: Mapping[str, Any] | None
    ) -> Mapping[str, Any]:
        if not injected or not self.injected:
            return arguments
        return {**arguments, **{n: injected[n] for n in self.injected if n in injected}}

    def _dump(self, value: Any, what: str) -> bytes:
        try:
            if type(value) is not self._output_model:
                value = self._validate_output(value)
            return self._serialize_output(value)
        except ValidationError as exc:
            raise InvalidOutput(
                f"capability {self.name!r} {what}: {_describe(exc, 'result')}",
                errors=json.loads(exc.json(include_url=False, include_input=False)),
            ) from exc
        except PydanticSerializationError as exc:
            raise InvalidOutput(
                f"capability {self.name!r} {what}: {exc}",
                errors=[{"type": "serialization", "loc": [], "msg": str(exc)}],
            ) from exc


@overload
def capability(fn: Callable[P, R], /) -> Capability[P, R]: ...


@overload
def capability(
    *,
    name: str | None = None,
    version: str = "0.1.0",
    description: str | None = None,
    tags: Sequence[str] = (),
    idempotent: bool = False,
    timeout: float | None = None,
) -> Callable[[Callable[P, R]], Capability[P, R]]: ...


def capability(
    fn: Callable[P, R] | None = None,
    /,
    *,
    name: str | None = None,
    version: str = "0.1.0",
    description: str | None = None,
    tags: Sequence[str] = (),
    idempotent: bool = False,
    timeout: float | None = None,
) -> Capability[P, R] | Callable[[Callable[P, R]], Capability[P, R]]:
    """Turn a function into a mesh capability; use it bare or with arguments.

    ::

        @capability(version="1.2.0", tags=["nlp"], idempotent=True)
        async def summarize(text: str, max_words: int = 40) -> Summary:
            \"\"\"Summarize a text.

            Args:
                text: The text to summarize.
                max_words: Upper bound on the summary's length.
            \"\"\"

    - ``name`` defaults to the function's name; ``description`` to the docstring's text before
      its first section. Parameter descriptions come from a Google ``Args:`` section, reST
      ``:param name:`` lines or a NumPy ``Parameters`` section, unless ``Field`` gives one.
    - Every parameter needs a type annotation; ``Annotated[int, Field(ge=1)]`` constraints and
      defaults are honoured. ``*args``, ``**kwargs`` and positional-only parameters are refused.
    - The return annotation is the output schema; none means any JSON value. An async generator
      streams: annotate it ``-> AsyncIterator[Item]``.
    - A parameter annotated ``Mesh`` (from :mod:`agentmesh.mesh`) is not an input: the runtime
      injects the agent's own mesh handle there, so that the capability can call other
      capabilities through its agent's sidecar::

          @capability
          async def report(topic: str, mesh: Mesh) -> str:
              return await mesh.call("summarize", {"text": topic})

    - ``idempotent=True`` lets the mesh retry a call that may already have run; ``timeout``
      (seconds) is the longest a call may take, advertised in the spec.

    Raises:
        ConfigurationError: at decoration time, naming the function and the parameter at fault.
    """
    options: dict[str, Any] = {
        "name": name,
        "version": version,
        "description": description,
        "tags": tags,
        "idempotent": idempotent,
        "timeout": timeout,
    }
    if fn is None:
        return lambda f: Capability(f, **options)
    if not callable(fn):
        raise ConfigurationError(
            f"capability() takes the function to decorate, got {fn!r}; "
            "pass options by keyword, e.g. @capability(name='summarize')"
        )
    return Capability(fn, **options)


def is_capability(obj: object) -> bool:
    """Whether ``obj`` is a decorated capability (how the runtime finds them in a module)."""
    return isinstance(obj, Capability)


def _qualname(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", repr(fn))


def _describe(exc: ValidationError, root: str) -> str:
    """Each failing field with pydantic's reason (``text: Field required; txt: ...``).

    A count alone ("2 error(s)") leaves the caller guessing which field to fix. ``root`` names
    a failure of the whole value (not JSON, not an object). A list of thousands of bad items
    names the first :data:`_MAX_LISTED`; the error list carries them all.
    """
    errors = exc.errors(include_url=False, include_input=False)
    text = "; ".join(
        f"{'.'.join(map(str, err['loc'])) or root}: {err['msg']}" for err in errors[:_MAX_LISTED]
    )
    more = len(errors) - _MAX_LISTED
    return text + (f"; and {more} more (see the error list)" if more > 0 else "")


def _model_name(cap_name: str) -> str:
    parts = re.split(r"[._]+", cap_name)
    return "".join(part[:1].upper() + part[1:] for part in parts) + "Input"


def _check_options(where: str, version: str, tags: Sequence[str], timeout: float | None) -> None:
    try:
        Version(version)
    except (InvalidVersion, TypeError) as exc:
        raise ConfigurationError(
            f"{where}: version {version!r} is not a PEP 440 version (e.g. 1.2.0)"
        ) from exc
    if isinstance(tags, str):
        raise ConfigurationError(f"{where}: tags must be a list of strings, e.g. tags=[{tags!r}]")
    if timeout is not None and not 0 < timeout < math.inf:
        raise ConfigurationError(
            f"{where}: timeout {timeout!r} must be a positive, finite number of seconds"
        )


def _check_parameter(where: str, param: inspect.Parameter, hints: Mapping[str, Any]) -> Any:
    """The parameter's resolved annotation, or a ConfigurationError saying what to change."""
    kind = param.kind
    if kind is inspect.Parameter.VAR_POSITIONAL:
        problem = "*args cannot be described by a schema; declare each input as a parameter"
    elif kind is inspect.Parameter.VAR_KEYWORD:
        problem = "**kwargs cannot be described by a schema; declare each input as a parameter"
    elif kind is inspect.Parameter.POSITIONAL_ONLY:
        problem = "is positional-only; inputs are passed by name, so remove the '/'"
    elif param.name not in hints:
        problem = f"has no type annotation; annotate it (e.g. {param.name}: str)"
    else:
        return hints[param.name]
    raise ConfigurationError(f"{where}: parameter {param.name!r} {problem}")


def _asks_for(annotation: Any, injectable: type) -> bool:
    """Whether a parameter annotation is ``injectable``, ``injectable | None`` or Annotated so."""
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return members == [injectable]
    return annotation is injectable


def _has_description(annotation: Any, default: Any) -> bool:
    metadata = typing.get_args(annotation)[1:] if typing.get_origin(annotation) is Annotated else ()
    return any(isinstance(m, FieldInfo) and m.description for m in (*metadata, default))


def _unsupported_parameter(annotations: Mapping[str, Any], exc: PydanticUserError) -> str:
    """Name the parameter whose type pydantic could not turn into a JSON schema."""
    for name, annotation in annotations.items():
        try:
            TypeAdapter(annotation).json_schema()
        except PydanticUserError as err:
            return f"parameter {name!r}: type {annotation!r} cannot be described as JSON: {err}"
    return f"cannot build the input schema: {exc}"


def _output_type(where: str, annotation: Any, streaming: bool) -> Any:
    """The type each result (or, when streaming, each item) is validated against."""
    origin = typing.get_origin(annotation) or annotation
    is_stream_type = origin in _STREAM_TYPES
    if not streaming:
        if is_stream_type:
            raise ConfigurationError(
                f"{where}: returns an async iterator but is not an async generator function; "
                "write it as async def with yield"
            )
        return annotation
    if annotation is Any:
        return Any
    if not is_stream_type:
        raise ConfigurationError(
            f"{where}: is an async generator, so annotate its return as AsyncIterator[Item] "
            f"(got {annotation!r})"
        )
    args = typing.get_args(annotation)
    return args[0] if args else Any


# Docstring sections. Text before the first of them is the capability's description.
_PARAM_SECTIONS = frozenset(
    {"args", "arguments", "parameters", "params", "keyword args", "keyword arguments"}
)
_SECTIONS = _PARAM_SECTIONS | frozenset(
    {
        "other parameters",
        "returns",
        "return",
        "yields",
        "yield",
        "raises",
        "examples",
        "example",
        "notes",
        "note",
        "attributes",
        "see also",
        "warnings",
        "warning",
        "references",
    }
)
_REST_FIELD = re.compile(r"^:[A-Za-z]+(?:\s[^:]*)?:")
_REST_PARAM = re.compile(
    r"^:(?:param|parameter|arg|argument|key|keyword)\s+(?:[^:]*\s)?\**(\w+)\s*:\s*(.*)$"
)
_GOOGLE_ENTRY = re.compile(r"^\**(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")
_NUMPY_RULE = re.compile(r"^\s*-{3,}\s*$")


def _parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """Split a docstring into its description and per-parameter descriptions.

    Understands Google (``Args:``), reST (``:param name:``) and NumPy (``Parameters`` over a
    ``----`` rule) styles.
    """
    lines = inspect.cleandoc(doc or "").splitlines()
    end = next((i for i in range(len(lines)) if _section_kind(lines, i)), len(lines))
    params: dict[str, str] = {}
    i = end
    while i < len(lines):
        kind = _section_kind(lines, i)
        header = lines[i].strip().rstrip(":").lower()
        if kind == "numpy":
            j = i + 2
            while j < len(lines) and _section_kind(lines, j) != "numpy":
                j += 1
            if header in _PARAM_SECTIONS:
                for head, rest in _entries(lines[i + 2 : j]):
                    for param in head.split(":")[0].split(","):
                        params[param.strip().lstrip("*")] = _join(rest)
        else:
            j = _block_end(lines, i + 1, _indent(lines[i]))
            if kind == "google" and header in _PARAM_SECTIONS:
                for head, rest in _entries(lines[i + 1 : j]):
                    if match := _GOOGLE_ENTRY.match(head):
                        params[match[1]] = _join([match[2], *rest])
            elif kind == "rest" and (match := _REST_PARAM.match(lines[i].strip())):
                params[match[1]] = _join([match[2], *lines[i + 1 : j]])
        i = j
    return "\n".join(lines[:end]).strip(), {name: text for name, text in params.items() if text}


def _section_kind(lines: Sequence[str], i: int) -> str | None:
    stripped = lines[i].strip()
    if _REST_FIELD.match(stripped):
        return "rest"
    if stripped.endswith(":") and stripped[:-1].lower() in _SECTIONS:
        return "google"
    if (
        stripped.lower() in _SECTIONS
        and i + 1 < len(lines)
        and _NUMPY_RULE.match(lines[i + 1]) is not None
    ):
        return "numpy"
    return None


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _block_end(lines: Sequence[str], start: int, indent: int) -> int:
    """Index of the first line from ``start`` that is not blank and not indented past ``indent``."""
    j = start
    while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > indent):
        j += 1
    return j


def _entries(body: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Group a section's lines: each line at the base indentation starts an entry."""
    lines = [line for line in body if line.strip()]
    base = min((_indent(line) for line in lines), default=0)
    entries: list[tuple[str, list[str]]] = []
    for line in lines:
        if _indent(line) == base:
            entries.append((line.strip(), []))
        elif entries:
            entries[-1][1].append(line)
    return entries


def _join(parts: Sequence[str]) -> str:
    return " ".join(part.strip() for part in parts if part.strip())
