"""The datastore's rules: image ids are plain names of its entries, and it stores only readable 2D slices.

MONAI Label's own ``LocalDatastore`` builds file paths from ids and tags as given (``PUT /datastore/?image=../../x``
writes two folders above the studies), and its ``/infer`` reads any existing path given as an image id. The
app uses :class:`GuardedLocalDatastore` and :func:`datastore_image_path` instead.
"""

from __future__ import annotations

import fnmatch
import os
import unicodedata
from typing import Any

from monai.transforms import LoadImage
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import ImageNotFoundException

from lib.errors import RequestError

MAX_NAME_BYTES = 200
ID_HINT = "image ids are names of datastore entries (GET /datastore/?output=all), not paths"
UPLOAD = "<the upload>"


def check_name(name: Any, what: str, hint: str = ID_HINT) -> str:
    """``name`` if it is usable as one file-name component inside the studies folder.

    Args:
        name: an image id or a label tag from a request.
        what: what it is, for the message (``"image id"``).
        hint: appended to the message.

    Returns:
        ``name`` unchanged.

    Raises:
        RequestError: 400 when it is empty or not a string, contains ``/`` or ``\\`` (so also every absolute
            path), is ``.`` or ``..``, contains a control character (NUL included) or exceeds 200 bytes.
    """
    if not isinstance(name, str) or not name:
        raise RequestError(400, f"{what} is missing or empty; {hint}")
    problem = None
    if "/" in name or "\\" in name:
        problem = "is a path (it contains a path separator)"
    elif name in (".", ".."):
        problem = "is a relative folder"
    elif any(unicodedata.category(character) == "Cc" for character in name):
        problem = "contains a control character (such as NUL)"
    elif len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        problem = f"is longer than {MAX_NAME_BYTES} bytes"
    if problem:
        raise RequestError(400, f"{what} {name!r} {problem}; {hint}")
    return name


def check_slice_file(path: str, what: str) -> None:
    """Reads ``path`` as the infer tasks do (MONAI's ``LoadImage``, then the bundle's ``EnsureSlice2D``).

    Args:
        path: the file, typically an upload's temporary copy.
        what: how the message names it (``"the uploaded image"``); the reader's own message names it ``<the upload>``.

    Raises:
        RequestError: 422 naming the reader's complaint when the file is unreadable (corrupt, truncated, not an
            image) or not a 2D single-slice image.
    """
    from bundle.data.transforms import EnsureSlice2D  # the bundle root is importable once the app is built

    try:
        EnsureSlice2D()(LoadImage(image_only=True, ensure_channel_first=True)(path))
    except Exception as error:
        detail = " ".join(str(error).replace(path, UPLOAD).replace(os.path.basename(path), UPLOAD).split())
        raise RequestError(422, f"{what} is not a readable 2D slice: {type(error).__name__}: {detail}") from error


def datastore_image_path(datastore: Datastore, image_id: Any) -> str:
    """The file of the datastore entry ``image_id``.

    Raises:
        RequestError: 400 when ``image_id`` is not a plain name (:func:`check_name`: a path, ``..``, NUL...),
            404 when no datastore entry has that id.
    """
    check_name(image_id, "image id")
    if image_id not in datastore.list_images():
        raise RequestError(404, f"image id {image_id!r} is not in the datastore (its ids: GET /datastore/?output=all)")
    return datastore.get_image_uri(image_id)


class GuardedLocalDatastore(LocalDatastore):
    """MONAI Label's ``LocalDatastore`` that writes only inside its studies folder and stores only 2D slices.

    Before anything is written, :meth:`add_image` and :meth:`save_label` require that the id (and the label
    tag) pass :func:`check_name`, that the upload's name ends with a datastore extension (``*.nii.gz``,
    ``*.nii``), that the file name built from the id maps back to the same id and resolves directly inside its
    folder of the studies, and that the upload reads as a 2D slice (:func:`check_slice_file`). Arguments are
    those of ``LocalDatastore``.
    """

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        derived_id, ext = self._split_upload_name(image_filename)
        image_id = check_name(image_id or derived_id, "image id", "give a file name without folders")
        self._check_destination(self._datastore.image_path(), image_id, ext)
        check_slice_file(image_filename, "the uploaded image")
        return super().add_image(image_id, image_filename, image_info)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        if image_id not in self._datastore.objects:
            raise ImageNotFoundException(f"Image {image_id} not found")
        check_name(label_tag, "label tag", "a tag is a folder name under labels/")
        _, ext = self._split_upload_name(label_filename)
        self._check_destination(self._datastore.label_path(label_tag), image_id, ext)
        check_slice_file(label_filename, "the uploaded label")
        return super().save_label(image_id, label_filename, label_tag, label_info)

    def _split_upload_name(self, filename: str) -> tuple[str, str]:
        """``(id, extension)`` of an upload's file name; 400 unless it ends with a datastore extension."""
        name = os.path.basename(filename)
        if not any(fnmatch.fnmatch(name, pattern) for pattern in self._extensions):
            endings = ", ".join(pattern.lstrip("*") for pattern in self._extensions)
            raise RequestError(400, f"the uploaded file's name must end with one of the datastore's formats: {endings}")
        return self._to_id(name)

    def _check_destination(self, folder: str, image_id: str, ext: str) -> None:
        """400 unless ``image_id + ext`` maps back to ``image_id`` and resolves directly inside ``folder``,
        itself inside the studies folder."""
        name = self._filename(image_id, ext)
        if self._to_id(name) != (image_id, ext):
            raise RequestError(
                400,
                f"image id {image_id!r} would be stored as {name!r}, which reads back as another id; "
                "leave the file extension out of the id",
            )
        studies = os.path.realpath(self._datastore_path)
        target = os.path.realpath(os.path.join(folder, name))
        if os.path.dirname(target) != os.path.realpath(folder) or os.path.commonpath([target, studies]) != studies:
            raise RequestError(400, f"{name!r} would resolve outside its folder of the studies")
