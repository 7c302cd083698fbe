"""Write docs/protocol.md: the hand-written preamble, then a reference generated from the proto comments.

    python scripts/gen_protocol_docs.py           # (re)write docs/protocol.md
    python scripts/gen_protocol_docs.py --check   # exit 1 if docs/protocol.md is stale (make check-protos)

The preamble (scripts/protocol_preamble.md) holds what no single proto element owns: connecting, byte
layouts, the rules of streams, errors and limits. The reference lists every service, RPC, message, field,
enum and enum value of protos/scholarembed/v1/ with its comment, read from a descriptor set that protoc
builds with source info; `buf lint` (COMMENTS) makes sure every one of them has a comment.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.resources
import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from google.protobuf import descriptor_pb2
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
PACKAGE_DIR = PROTOS / "scholarembed" / "v1"
PREAMBLE = Path(__file__).with_name("protocol_preamble.md")
OUTPUT = ROOT / "docs" / "protocol.md"

# Field numbers of the descriptor messages, as used in SourceCodeInfo.Location.path.
FILE_SYNTAX, FILE_MESSAGE, FILE_ENUM, FILE_SERVICE = 12, 4, 5, 6
MESSAGE_FIELD, MESSAGE_NESTED, MESSAGE_ENUM = 2, 3, 4
ENUM_VALUE, SERVICE_METHOD = 2, 2

FieldType = descriptor_pb2.FieldDescriptorProto
SCALARS = {
    value: name.removeprefix("TYPE_").lower()
    for name, value in FieldType.Type.items()
    if name not in ("TYPE_MESSAGE", "TYPE_ENUM", "TYPE_GROUP")
}
# Types from other packages: where a reader finds them.
EXTERNAL_LINKS = {".google.rpc.Status": "#googlerpcstatus"}


def descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    """protos/scholarembed/v1/*.proto with their comments (SourceCodeInfo), as protoc parses them."""
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    files = sorted(str(path.relative_to(PROTOS)) for path in PACKAGE_DIR.glob("*.proto"))
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "descriptors.binpb"
        arguments = ["protoc", f"-I{PROTOS}", f"-I{well_known}", "--include_source_info",
                     f"--descriptor_set_out={output}", *files]  # fmt: skip
        if protoc.main(arguments) != 0:
            raise SystemExit("protoc failed on protos/ (see above)")
        return descriptor_pb2.FileDescriptorSet.FromString(output.read_bytes())


class Comments:
    """Leading comments of one file's elements, by their SourceCodeInfo path."""

    def __init__(self, file: descriptor_pb2.FileDescriptorProto) -> None:
        self._by_path = {tuple(location.path): location.leading_comments for location in file.source_code_info.location}

    def lines(self, *path: int) -> list[str]:
        text = self._by_path.get(path, "")
        return [line.removeprefix(" ").rstrip() for line in text.rstrip("\n").split("\n")] if text else []

    def inline(self, *path: int) -> str:
        """The comment as one line, for a table cell."""
        return " ".join(line.strip() for line in self.lines(*path) if line.strip()).replace("|", "\\|")

    def block(self, *path: int) -> str:
        """The comment as Markdown: lines joined into paragraphs, indented lines kept as preformatted text."""
        return markdown(self.lines(*path))


def markdown(lines: Sequence[str]) -> str:
    parts: list[str] = []
    paragraph: list[str] = []
    preformatted: list[str] = []

    def flush() -> None:
        if paragraph:
            parts.append(" ".join(paragraph))
            paragraph.clear()
        if preformatted:
            parts.append("```text\n" + "\n".join(preformatted) + "\n```")
            preformatted.clear()

    for line in lines:
        if line.startswith(" "):
            if paragraph:
                flush()
            preformatted.append(line)
        elif line:
            if preformatted:
                flush()
            paragraph.append(line)
        else:
            flush()
    flush()
    return "\n\n".join(parts)


def anchor(name: str) -> str:
    """GitHub's anchor for a heading whose text is `name` in backticks."""
    return "#" + re.sub(r"[^a-z0-9_ -]", "", name.lower()).replace(" ", "-")


class Reference:
    """The generated half of protocol.md."""

    def __init__(self, files: Sequence[descriptor_pb2.FileDescriptorProto]) -> None:
        self.files = files
        self.package = files[0].package
        self.map_entries = {
            f".{file.package}.{message.name}.{nested.name}": nested
            for file in files
            for message in file.message_type
            for nested in message.nested_type
            if nested.options.map_entry
        }

    def type_name(self, field: descriptor_pb2.FieldDescriptorProto) -> str:
        if field.type_name in self.map_entries:
            key, value = self.map_entries[field.type_name].field
            return f"map<{self.type_name(key)}, {self.type_name(value)}>"
        if field.type in SCALARS:
            name = SCALARS[field.type]
        elif field.type_name.startswith(f".{self.package}."):
            short = field.type_name.removeprefix(f".{self.package}.")
            name = f"[{short}]({anchor(short)})"
        else:
            full = field.type_name.removeprefix(".")
            name = f"[{full}]({EXTERNAL_LINKS[field.type_name]})" if field.type_name in EXTERNAL_LINKS else full
        return f"repeated {name}" if field.label == FieldType.LABEL_REPEATED else name

    def lines(self) -> Iterator[str]:
        yield "## Reference"
        yield ""
        yield (
            f"Generated from the comments in `protos/{self.package.replace('.', '/')}/`. Package `{self.package}`. "
            "Every field is optional on the wire (proto3): an unset field reads as its zero value "
            '(0, "", false, empty list, the enum\'s `_UNSPECIFIED`), and the comments say what that zero means.'
        )
        for file in self.files:
            yield from self.file_lines(file)

    def file_lines(self, file: descriptor_pb2.FileDescriptorProto) -> Iterator[str]:
        comments = Comments(file)
        yield ""
        yield f"### `{file.name}`"
        yield ""
        yield comments.block(FILE_SYNTAX)
        for service_index, service in enumerate(file.service):
            yield ""
            yield f"#### `{service.name}`"
            yield ""
            yield comments.block(FILE_SERVICE, service_index)
            yield ""
            yield "| RPC | request | response | kind |"
            yield "|---|---|---|---|"
            for method in service.method:
                request = method.input_type.removeprefix(f".{self.package}.")
                response = method.output_type.removeprefix(f".{self.package}.")
                kind = {
                    (False, False): "unary",
                    (True, True): "bidirectional stream",
                    (True, False): "client stream",
                    (False, True): "server stream",
                }[(method.client_streaming, method.server_streaming)]
                yield (
                    f"| [{method.name}]({anchor(f'{service.name}.{method.name}')}) "
                    f"| [{request}]({anchor(request)}) | [{response}]({anchor(response)}) | {kind} |"
                )
            for method_index, method in enumerate(service.method):
                stream = "stream " if method.client_streaming else ""
                returns = "stream " if method.server_streaming else ""
                request = method.input_type.removeprefix(f".{self.package}.")
                response = method.output_type.removeprefix(f".{self.package}.")
                yield ""
                yield f"##### `{service.name}.{method.name}`"
                yield ""
                yield f"`rpc {method.name}({stream}{request}) returns ({returns}{response})`"
                yield ""
                yield comments.block(FILE_SERVICE, service_index, SERVICE_METHOD, method_index)
        for index, enum in enumerate(file.enum_type):
            yield from self.enum_lines(comments, enum, (FILE_ENUM, index))
        for index, message in enumerate(file.message_type):
            yield from self.message_lines(comments, message, (FILE_MESSAGE, index))

    def message_lines(
        self, comments: Comments, message: descriptor_pb2.DescriptorProto, path: tuple[int, ...]
    ) -> Iterator[str]:
        yield ""
        yield f"#### `{message.name}`"
        yield ""
        yield comments.block(*path)
        if message.field:
            yield ""
            yield "| field | number | type | meaning |"
            yield "|---|---|---|---|"
            for index, field in enumerate(message.field):
                yield (
                    f"| `{field.name}` | {field.number} | {self.type_name(field)} "
                    f"| {comments.inline(*path, MESSAGE_FIELD, index)} |"
                )
        else:
            yield ""
            yield "No fields."
        for index, enum in enumerate(message.enum_type):
            yield from self.enum_lines(comments, enum, (*path, MESSAGE_ENUM, index))

    def enum_lines(
        self, comments: Comments, enum: descriptor_pb2.EnumDescriptorProto, path: tuple[int, ...]
    ) -> Iterator[str]:
        yield ""
        yield f"#### `{enum.name}`"
        yield ""
        yield comments.block(*path)
        yield ""
        yield "| value | number | meaning |"
        yield "|---|---|---|"
        for index, value in enumerate(enum.value):
            yield f"| `{value.name}` | {value.number} | {comments.inline(*path, ENUM_VALUE, index)} |"


def render() -> str:
    files = [f for f in descriptor_set().file if f.package == "scholarembed.v1"]
    reference = "\n".join(Reference(files).lines())
    return PREAMBLE.read_text().rstrip("\n") + "\n\n" + reference.rstrip("\n") + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if docs/protocol.md differs from what is generated")
    arguments = parser.parse_args(argv)
    text = render()
    if arguments.check:
        current = OUTPUT.read_text() if OUTPUT.exists() else ""
        if current != text:
            diff = difflib.unified_diff(
                current.splitlines(), text.splitlines(), "docs/protocol.md", "generated", lineterm="", n=1
            )
            print("\n".join(list(diff)[:40]), file=sys.stderr)
            print("docs/protocol.md is stale: run make protos (or scripts/gen_protocol_docs.py)", file=sys.stderr)
            return 1
        print("docs/protocol.md is fresh")
        return 0
    OUTPUT.parent.mkdir(exist_ok=True)
    OUTPUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
