"""A model directory sent as one archive (zip or tar, gzip allowed), read member by member.

Nothing in an archive is trusted: only regular files are read (links,
devices and directories are skipped or refused), every path must be
relative and stay inside the directory, and the number of members and the
bytes they unpack to are capped before anything is read, so a small upload
cannot unpack into a large one.
"""

from __future__ import annotations

import io
import tarfile
import zipfile

from popex.errors import SpecError
from popex.runtime.model_files import check_file_path

__all__ = ["MAX_ARCHIVE_MEMBERS", "read_model_archive"]

#: Most files one model archive may hold.
MAX_ARCHIVE_MEMBERS = 512


def _strip_top_folder(files: dict[str, bytes]) -> dict[str, bytes]:
    """``my-model/model.json`` -> ``model.json`` when every member sits in one top folder."""
    tops = {path.split("/", 1)[0] for path in files}
    if len(tops) == 1 and all("/" in path for path in files):
        return {path.split("/", 1)[1]: data for path, data in files.items()}
    return files


def read_model_archive(data: bytes, *, max_bytes: int) -> dict[str, bytes]:
    """The files of a model directory from a zip or (gzipped) tar archive, by relative path.

    Parameters
    ----------
    data : bytes
    max_bytes : int
        Largest total of the unpacked files.

    Returns
    -------
    dict of str to bytes

    Raises
    ------
    SpecError
        If it is neither archive kind, a member is a link or leaves the
        directory, or the members are too many or too large.
    """
    members: list[tuple[str, int]] = []
    reader = None
    if data[:4] == b"PK\x03\x04":
        try:
            archive = zipfile.ZipFile(io.BytesIO(data))
        except zipfile.BadZipFile as err:
            raise SpecError(f"the archive is not a readable zip: {err}") from err
        infos = [info for info in archive.infolist() if not info.is_dir()]
        members = [(info.filename, info.file_size) for info in infos]
        reader = {info.filename: (lambda info=info: archive.read(info)) for info in infos}
    else:
        try:
            archive_tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
            infos_tar = archive_tar.getmembers()
        except (tarfile.TarError, EOFError, OSError) as err:
            raise SpecError("the archive must be a zip or a tar (optionally gzipped) of the model directory") from err
        for info in infos_tar:
            if info.isdir():
                continue
            if not info.isfile():
                raise SpecError(f"archive member {info.name[:80]!r} is a link or special file; only regular "
                                "files are accepted")
        files_tar = [info for info in infos_tar if info.isfile()]
        members = [(info.name, info.size) for info in files_tar]
        reader = {info.name: (lambda info=info: archive_tar.extractfile(info).read()) for info in files_tar}
    if len(members) > MAX_ARCHIVE_MEMBERS:
        raise SpecError(f"the archive holds {len(members)} files; at most {MAX_ARCHIVE_MEMBERS} are accepted")
    total = sum(size for _, size in members)
    if total > max_bytes:
        raise SpecError(f"the archive unpacks to {total} bytes; at most {max_bytes} are accepted")
    files: dict[str, bytes] = {}
    for name, _ in members:
        path = name.removeprefix("./")
        check_file_path(path)
        if path in files:
            raise SpecError(f"archive member {path[:80]!r} appears twice")
        content = reader[name]()
        if len(content) > max_bytes:
            raise SpecError(f"archive member {path[:80]!r} unpacks larger than it declares")
        files[path] = content
    if not files:
        raise SpecError("the archive holds no files")
    return _strip_top_folder(files)
