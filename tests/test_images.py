"""Image stores: directory and PixelRec LMDB reading, mode conversion, bad files, safety, pickling."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import lmdb
import numpy as np
import pytest
from PIL import Image

from pixelrec.data import images
from pixelrec.data.images import (
    DirImageStore,
    ImageLoadError,
    LmdbImageStore,
    open_image_store,
    to_rgb,
)
from pixelrec.data.lmdb_writer import encode_pixelrec_record, write_pixelrec_lmdb
from pixelrec.errors import PixelrecError

RED, GREEN, BLUE = (220, 30, 40), (30, 200, 60), (20, 40, 210)


def solid(colour, size=(32, 32), mode="RGB") -> Image.Image:
    return Image.new(mode, size, colour)


def noisy(seed: int = 0, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def pixel(img: Image.Image, xy=(5, 5)) -> np.ndarray:
    return np.asarray(img, dtype=np.int64)[xy[1], xy[0]]


def close(a, b, tol=12) -> bool:
    return bool(np.all(np.abs(np.asarray(a, dtype=np.int64) - np.asarray(b, dtype=np.int64)) <= tol))


class LMDB_Image:
    """A user's own copy of PixelRec's class, importable from this test module."""

    def __init__(self, image, id):
        self.channels, self.size, self.image, self.id = image.shape[2], image.shape[:2], image.tobytes(), id


def write_raw_lmdb(path: Path, entries: dict[bytes, bytes]) -> None:
    env = lmdb.open(str(path), subdir=False, map_size=1 << 24, lock=False)
    with env.begin(write=True) as txn:
        for key, value in entries.items():
            txn.put(key, value)
    env.close()


# ---------------------------------------------------------------------------- directory store


def test_dir_store_reads_every_extension(tmp_path):
    solid(RED).save(tmp_path / "a.jpg")
    solid(GREEN).save(tmp_path / "b.png")
    solid(BLUE).save(tmp_path / "c.webp", quality=95)
    solid(RED).save(tmp_path / "d.JPEG", format="JPEG")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.jpg").write_bytes(b"junk")
    (tmp_path / "sub.jpg").mkdir()

    store = DirImageStore(tmp_path)
    assert store.ids() == ["a", "b", "c", "d"]
    assert len(store) == 4 and "b" in store and "notes" not in store and "sub" not in store
    assert str(tmp_path) in store.describe() and store.source == str(tmp_path)
    for item_id, colour in [("a", RED), ("b", GREEN), ("c", BLUE), ("d", RED)]:
        img = store.load(item_id)
        assert img.mode == "RGB" and img.size == (32, 32)
        assert close(pixel(img), colour), (item_id, pixel(img))


def test_dir_store_prefers_jpg_for_duplicate_ids(tmp_path):
    solid(GREEN).save(tmp_path / "x.png")
    solid(RED).save(tmp_path / "x.jpg")
    solid(BLUE).save(tmp_path / "x.webp")
    store = DirImageStore(tmp_path)
    assert store.ids() == ["x"]
    assert store.duplicates == {"x": ["x.jpg", "x.png", "x.webp"]}
    assert store.path_of("x").name == "x.jpg"
    assert close(pixel(store.load("x")), RED)


def test_missing_and_empty_dirs_are_user_errors(tmp_path):
    with pytest.raises(PixelrecError, match="not found") as exc:
        DirImageStore(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(exc.value)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    with pytest.raises(PixelrecError, match=r"no \.jpg/\.jpeg/\.png/\.webp images") as exc:
        DirImageStore(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(exc.value)


# ---------------------------------------------------------------------------- modes


def test_modes_convert_to_rgb(tmp_path):
    solid(90, mode="L").save(tmp_path / "gray.png")
    solid(RED).quantize(4).save(tmp_path / "pal.png")

    rgba = solid((0, 0, 255, 255), mode="RGBA")
    rgba.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent black
    rgba.putpixel((1, 0), (0, 0, 0, 128))  # half transparent black
    rgba.save(tmp_path / "alpha.png")

    pal_t = Image.new("P", (32, 32), 0)
    pal_t.putpalette([*RED, 0, 0, 0])
    pal_t.putpixel((0, 0), 1)
    pal_t.save(tmp_path / "paltrans.png", transparency=1)  # index 1 (black) is transparent

    solid((0, 255, 255, 0), mode="CMYK").save(tmp_path / "cmyk.jpg", quality=95)  # pure red
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(tmp_path / "deep.png")
    solid(1, mode="1").save(tmp_path / "bits.png")

    store = DirImageStore(tmp_path)
    assert all(store.load(i).mode == "RGB" for i in store.ids())
    assert close(pixel(store.load("gray")), (90, 90, 90), 0)
    assert close(pixel(store.load("pal")), RED, 20)
    alpha = store.load("alpha")
    assert tuple(pixel(alpha, (0, 0))) == (255, 255, 255)  # transparent -> white, not black
    assert close(pixel(alpha, (1, 0)), (127, 127, 127), 2)
    assert tuple(pixel(alpha, (5, 5))) == (0, 0, 255)
    assert tuple(pixel(store.load("paltrans"), (0, 0))) == (255, 255, 255)
    assert tuple(pixel(store.load("paltrans"))) == RED
    assert close(pixel(store.load("cmyk")), (255, 0, 0), 10)
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    assert close(pixel(store.load("deep")), (156, 156, 156), 1)  # 40000 / 257, scaled not clipped
    assert tuple(pixel(store.load("bits"))) == (255, 255, 255)


def test_to_rgb_high_depth_and_float():
    assert tuple(pixel(to_rgb(solid(65535, mode="I;16")))) == (255, 255, 255)
    assert tuple(pixel(to_rgb(solid(1000, mode="I")))) == (4, 4, 4)
    assert tuple(pixel(to_rgb(solid(200, mode="I")))) == (200, 200, 200)  # 8-bit data kept
    assert tuple(pixel(to_rgb(solid(0.5, mode="F")))) == (128, 128, 128)
    assert tuple(pixel(to_rgb(solid(77.0, mode="F")))) == (77, 77, 77)
    assert tuple(pixel(to_rgb(solid((10, 20, 30, 0), mode="RGBA")))) == (255, 255, 255)
    assert tuple(pixel(to_rgb(solid((90, 0), mode="LA")))) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    img = solid(RED, size=(40, 20))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert DirImageStore(tmp_path).load("rot").size == (20, 40)


# ---------------------------------------------------------------------------- bad files


def test_bad_files_have_distinct_reasons(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "junk.jpg").write_bytes(os.urandom(500))
    buf = io.BytesIO()
    Image.fromarray(noisy(1, 128)).save(buf, "JPEG", quality=95)
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    solid(RED).save(tmp_path / "gone.jpg")
    solid(RED).save(tmp_path / "ok.jpg")
    store = DirImageStore(tmp_path)
    (tmp_path / "gone.jpg").unlink()  # disappears after the scan

    reasons = {}
    for item_id in ["empty", "junk", "cut", "gone", "never"]:
        with pytest.raises(ImageLoadError) as exc:
            store.load(item_id)
        err = exc.value
        assert err.item_id == item_id and f"item {item_id}:" in str(err) and "\n" not in str(err)
        assert isinstance(err, PixelrecError)
        reasons[item_id] = err.reason
    assert reasons["empty"] == "zero-byte file"
    assert reasons["junk"] == "not a recognised image format"
    assert reasons["cut"].startswith("corrupt or truncated image:") and "truncated" in reasons["cut"]
    assert reasons["gone"] == "missing" and reasons["never"] == "missing"
    assert str(tmp_path / "empty.jpg") in str(pytest.raises(ImageLoadError, store.load, "empty").value)
    assert store.load("ok").mode == "RGB"


def test_image_load_error_pickles():
    err = pickle.loads(pickle.dumps(ImageLoadError("i7", "zero-byte file", "/x/i7.jpg")))
    assert (err.item_id, err.reason, str(err)) == ("i7", "zero-byte file", "item i7: zero-byte file (/x/i7.jpg)")


def test_pixel_cap_reports_too_large_or_loads_reduced(tmp_path, monkeypatch):
    Image.fromarray(noisy(2, 64)).save(tmp_path / "big.jpg")
    Image.fromarray(noisy(3, 64)).save(tmp_path / "big2.png")
    store = DirImageStore(tmp_path)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 64 * 64 - 1)
    with pytest.raises(ImageLoadError, match=r"image too large \(64 x 64\)"):
        store.load("big")
    with pytest.raises(ImageLoadError, match=r"image too large \(64 x 64\)"):
        store.load("big2", max_side=16)  # PNG cannot be reduced while decoding
    reduced = store.load("big", max_side=16)  # JPEG decodes at 1/4 scale, under the cap
    assert reduced.mode == "RGB" and reduced.size == (16, 16)


def test_jpeg_above_pillows_bomb_limit_loads_reduced(tmp_path):
    side = 14000  # 196M pixels: above Pillow's default error threshold (2 x 89.5M)
    assert side * side > 2 * Image.MAX_IMAGE_PIXELS
    Image.new("L", (side, side), 77).save(tmp_path / "huge.jpg", quality=50)
    limit_before = Image.MAX_IMAGE_PIXELS
    img = DirImageStore(tmp_path).load("huge", max_side=1000)
    assert img.mode == "RGB" and img.size == (1750, 1750)  # 1/8 scale, still >= max_side
    assert close(pixel(img), (77, 77, 77), 2)
    assert Image.MAX_IMAGE_PIXELS == limit_before  # Pillow's global setting is left alone
    with pytest.raises(Image.DecompressionBombError):
        Image.open(tmp_path / "huge.jpg")


# ---------------------------------------------------------------------------- LMDB store


def test_lmdb_roundtrip_is_pixel_exact(tmp_path):
    rgb = noisy(4, 24)
    gray = noisy(5, 16)[:, :, :1]
    rgba = np.dstack([noisy(6, 8), np.full((8, 8, 1), 255, np.uint8)])
    rgba[0, 0, 3] = 0
    path = tmp_path / "covers.lmdb"
    assert write_pixelrec_lmdb(path, [("i1", rgb), ("i2", gray), ("i3", rgba)]) == 3
    assert path.is_file() and not list(tmp_path.glob(".covers.lmdb.*"))

    store = open_image_store(path)
    assert isinstance(store, LmdbImageStore)
    assert store.ids() == ["i1", "i2", "i3"] and len(store) == 3 and "i2" in store
    assert str(path) in store.describe()
    assert np.array_equal(np.asarray(store.load("i1")), rgb)
    assert np.array_equal(np.asarray(store.load("i2")), np.repeat(gray, 3, axis=2))
    loaded4 = np.asarray(store.load("i3"))
    assert tuple(loaded4[0, 0]) == (255, 255, 255) and np.array_equal(loaded4[1:, 1:], rgba[1:, 1:, :3])
    with pytest.raises(ImageLoadError, match="missing") as exc:
        store.load("i9")
    assert exc.value.item_id == "i9"


def test_lmdb_directory_layout_and_special_keys(tmp_path):
    (tmp_path / "db").mkdir()
    write_pixelrec_lmdb(tmp_path / "db", [("b", noisy(7, 8)), ("a", noisy(8, 8))])
    assert (tmp_path / "db" / "data.mdb").is_file()
    env = lmdb.open(str(tmp_path / "db"), readonly=True, lock=False)
    with env.begin() as txn:
        assert pickle.loads(txn.get(b"__keys__")) == [b"b", b"a"]
        assert pickle.loads(txn.get(b"__len__")) == 2
    env.close()
    store = open_image_store(tmp_path / "db")
    assert isinstance(store, LmdbImageStore) and store.ids() == ["a", "b"]
    assert open_image_store(tmp_path / "db").ids() == ["a", "b"]  # a second store on the same files


def test_lmdb_readable_by_pixelrec_code_with_its_main_class(tmp_path):
    arr = noisy(9, 12)
    write_pixelrec_lmdb(tmp_path / "x.lmdb", [("i1", arr)])
    script = f"""
import pickle, lmdb, numpy as np
class LMDB_Image:
    def __init__(self, image, id):
        self.channels = image.shape[2]; self.size = image.shape[:2]; self.image = image.tobytes(); self.id = id
    def get_image(self):
        return np.frombuffer(self.image, dtype=np.uint8).reshape(*self.size, self.channels)
env = lmdb.open({str(tmp_path / 'x.lmdb')!r}, subdir=False, readonly=True, lock=False)
with env.begin() as txn:
    obj = pickle.loads(txn.get(b"i1"))
print(type(obj).__module__, obj.id, int(obj.get_image().astype(np.int64).sum()))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["__main__", "i1", str(int(arr.astype(np.int64).sum()))]


def test_lmdb_reads_lmdb_image_from_any_module_without_keys_index(tmp_path, monkeypatch):
    module = types.ModuleType("someones_script")

    class LMDB_Image:
        def __init__(self, image, id):
            self.channels, self.size, self.image, self.id = image.shape[2], image.shape[:2], image.tobytes(), id

    LMDB_Image.__module__, LMDB_Image.__qualname__ = module.__name__, "LMDB_Image"
    module.LMDB_Image = LMDB_Image
    monkeypatch.setitem(sys.modules, module.__name__, module)
    arr = noisy(10, 10)
    entries = {b"k1": pickle.dumps(LMDB_Image(arr, "k1")), b"k0": pickle.dumps(LMDB_Image(arr[::-1].copy(), "k0"), protocol=0)}
    write_raw_lmdb(tmp_path / "other.lmdb", entries)
    monkeypatch.delitem(sys.modules, module.__name__)  # reading must not need the class

    store = open_image_store(tmp_path / "other.lmdb")
    assert store.ids() == ["k0", "k1"]
    assert np.array_equal(np.asarray(store.load("k1")), arr)
    assert np.array_equal(np.asarray(store.load("k0")), arr[::-1])


def test_lmdb_keys_index_lists_failed_items(tmp_path):
    arr = noisy(11, 8)
    write_raw_lmdb(tmp_path / "k.lmdb", {
        b"a": encode_pixelrec_record("a", arr),
        b"__keys__": pickle.dumps([b"a", b"lost"]),
        b"__len__": pickle.dumps(2),
    })
    store = LmdbImageStore(tmp_path / "k.lmdb")
    assert store.ids() == ["a", "lost"] and store.listed_without_record == ["lost"]
    with pytest.raises(ImageLoadError, match="listed in __keys__ but has no record"):
        store.load("lost")


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    write_raw_lmdb(tmp_path / "evil.lmdb", {b"bad": pickle.dumps(Evil()), b"junk": b"\x80\x04not a pickle"})
    store = open_image_store(tmp_path / "evil.lmdb")
    with pytest.raises(ImageLoadError) as exc:
        store.load("bad")
    assert exc.value.reason.startswith("unsafe pickle refused") and "system" in exc.value.reason
    assert not marker.exists()
    with pytest.raises(ImageLoadError, match="corrupt LMDB record") as exc:
        store.load("junk")
    assert exc.value.item_id == "junk"


def test_inconsistent_records_are_corrupt(tmp_path):
    wrong_size, two_channels, not_bytes = (LMDB_Image(noisy(k, 4), "x") for k in range(3))
    wrong_size.size = (9, 9)
    two_channels.channels = 2
    not_bytes.image = [1, 2, 3]
    write_raw_lmdb(tmp_path / "c.lmdb", {b"a": pickle.dumps(wrong_size), b"b": pickle.dumps(two_channels),
                                         b"c": pickle.dumps(not_bytes), b"d": pickle.dumps([1, 2])})
    store = open_image_store(tmp_path / "c.lmdb")
    reasons = {}
    for item_id in "abcd":
        with pytest.raises(ImageLoadError) as exc:
            store.load(item_id)
        reasons[item_id] = exc.value.reason
    assert reasons == {
        "a": "corrupt LMDB record: 48 bytes for a 9x9x3 uint8 image",
        "b": "corrupt LMDB record: 2 channels (expected 1, 3 or 4)",
        "c": "corrupt LMDB record: image data is list, expected bytes",
        "d": "corrupt LMDB record: expected an LMDB_Image object, got list",
    }


def test_evil_keys_index_is_refused(tmp_path):
    write_raw_lmdb(tmp_path / "evil.lmdb", {b"__keys__": pickle.dumps(os.getcwd)})
    with pytest.raises(PixelrecError, match="__keys__.*refused"):
        LmdbImageStore(tmp_path / "evil.lmdb")


def test_unreadable_lmdb_paths_are_user_errors(tmp_path):
    (tmp_path / "garbage.lmdb").write_bytes(os.urandom(8192))
    with pytest.raises(PixelrecError, match="cannot open as an LMDB") as exc:
        open_image_store(tmp_path / "garbage.lmdb")
    assert str(tmp_path / "garbage.lmdb") in str(exc.value)
    (tmp_path / "dir.lmdb").mkdir()
    with pytest.raises(PixelrecError, match="cannot open as an LMDB"):
        open_image_store(tmp_path / "dir.lmdb")
    with pytest.raises(PixelrecError, match="not found"):
        open_image_store(tmp_path / "absent.lmdb")


def test_writer_rejects_bad_input(tmp_path):
    with pytest.raises(PixelrecError, match="uint8 HxWxC"):
        write_pixelrec_lmdb(tmp_path / "a.lmdb", [("a", np.zeros((4, 4), np.uint8))])
    with pytest.raises(PixelrecError, match="item a: given twice"):
        write_pixelrec_lmdb(tmp_path / "b.lmdb", [("a", noisy(0, 4)), ("a", noisy(1, 4))])
    with pytest.raises(PixelrecError, match="ASCII"):
        write_pixelrec_lmdb(tmp_path / "c.lmdb", [("é", noisy(0, 4))])
    assert not any(tmp_path.iterdir())  # nothing half-written left behind


def test_open_image_store_picks_the_right_store(tmp_path):
    (tmp_path / "covers").mkdir()
    solid(RED).save(tmp_path / "covers" / "a.jpg")
    assert isinstance(open_image_store(tmp_path / "covers"), DirImageStore)
    with pytest.raises(PixelrecError, match="image store not found"):
        open_image_store(tmp_path / "nothing")


# ---------------------------------------------------------------------------- worker processes


def _store_pair(tmp_path: Path) -> tuple[DirImageStore, LmdbImageStore, dict[str, np.ndarray]]:
    arrays = {f"i{k}": noisy(20 + k, 16) for k in range(6)}
    (tmp_path / "covers").mkdir()
    for item_id, arr in arrays.items():
        Image.fromarray(arr).save(tmp_path / "covers" / f"{item_id}.png")
    write_pixelrec_lmdb(tmp_path / "covers.lmdb", arrays.items())
    return DirImageStore(tmp_path / "covers"), LmdbImageStore(tmp_path / "covers.lmdb"), arrays


def test_stores_pickle_and_load_in_another_process(tmp_path):
    dir_store, lmdb_store, arrays = _store_pair(tmp_path)
    lmdb_store.load("i0")  # environment open in this process; it must not travel
    blob = pickle.dumps((dir_store, lmdb_store))
    assert b"Environment" not in blob
    copy = pickle.loads(blob)[1]
    assert np.array_equal(np.asarray(copy.load("i3")), arrays["i3"])
    (tmp_path / "stores.pkl").write_bytes(blob)
    script = f"""
import pickle, numpy as np
d, l = pickle.loads(open({str(tmp_path / 'stores.pkl')!r}, 'rb').read())
print(sum(int(np.asarray(s.load(i)).astype(np.int64).sum()) for s in (d, l) for i in l.ids()))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert int(out) == 2 * sum(int(a.astype(np.int64).sum()) for a in arrays.values())


class _Pixels:
    def __init__(self, store, ids):
        self.store, self.ids = store, ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, k):
        return np.asarray(self.store.load(self.ids[k]))


def test_stores_work_in_dataloader_workers(tmp_path):
    torch = pytest.importorskip("torch")
    dir_store, lmdb_store, arrays = _store_pair(tmp_path)
    for store in (dir_store, lmdb_store):
        store.load("i1")  # open in the parent before the workers fork
        ids = store.ids()
        loader = torch.utils.data.DataLoader(_Pixels(store, ids), batch_size=2, num_workers=2)
        batches = torch.cat(list(loader)).numpy()
        assert np.array_equal(batches, np.stack([arrays[i] for i in ids]))


# ---- names and file kinds a covers folder may hold (the id rule, data.ids)


def test_cover_files_with_invalid_or_reserved_names_are_listed_as_failed(tmp_path):
    good = "ok"
    hostile = {"n1\nn2": "U+000A", "cr\rx": "U+000D", "tab\tx": "U+0009", "rtl\u202ex": "RIGHT-TO-LEFT OVERRIDE",
               "zw\u200bx": "ZERO WIDTH SPACE", "[PAD]": "reserved", "[unused]": "reserved", " lead": "space"}
    for name in [good, *hostile]:
        solid((10, 20, 30)).save(tmp_path / f"{name}.png")
    long_name = "x" * 251  # 255 bytes with ".png": the longest file name; the id itself is fine
    solid((1, 2, 3)).save(tmp_path / f"{long_name}.png")
    store = DirImageStore(tmp_path)
    assert store.ids() == sorted([good, long_name])
    assert set(store.refused) == set(hostile)
    for name, needle in hostile.items():
        assert needle in store.refused[name] and "\n" not in store.refused[name]
        with pytest.raises(ImageLoadError, match="not a valid item id"):
            store.load(name)


def test_special_files_and_links_in_a_covers_folder_are_listed_as_failed(tmp_path):
    covers, outside = tmp_path / "covers", tmp_path / "elsewhere"
    covers.mkdir()
    outside.mkdir()
    solid((200, 0, 0)).save(covers / "real.png")
    solid((0, 200, 0)).save(outside / "secret.png")
    os.mkfifo(covers / "fifo.jpg")
    (covers / "dir.jpg").mkdir()
    os.symlink(covers / "gone.png", covers / "broken.png")
    os.symlink(covers / "loop2.png", covers / "loop1.png")
    os.symlink(covers / "loop1.png", covers / "loop2.png")
    os.symlink(outside / "secret.png", covers / "out.png")
    os.symlink(covers / "real.png", covers / "inside.png")  # a link that stays in the folder is a cover
    store = DirImageStore(covers)
    assert store.ids() == ["inside", "real"]
    reasons = store.refused
    assert set(reasons) == {"fifo", "dir", "broken", "loop1", "loop2", "out"}
    assert "FIFO" in reasons["fifo"] and "directory" in reasons["dir"]
    assert reasons["broken"] == "broken symbolic link" and reasons["loop1"] == "symbolic link loop"
    assert "outside the covers folder" in reasons["out"] and "--follow-symlinks" in reasons["out"]
    assert np.array_equal(np.asarray(store.load("inside")), np.asarray(store.load("real")))
    followed = open_image_store(covers, follow_symlinks=True)
    assert followed.ids() == ["inside", "out", "real"] and "out" not in followed.refused
    assert pixel(followed.load("out"))[1] == 200


def test_lmdb_keys_that_are_not_valid_ids_are_listed_as_failed(tmp_path):
    arr = noisy(12, 8)
    write_raw_lmdb(tmp_path / "k.lmdb", {b"good": encode_pixelrec_record("good", arr),
                                         b"n1\nn2": encode_pixelrec_record("x", arr),
                                         b"[PAD]": encode_pixelrec_record("y", arr),
                                         b"bad\xff": encode_pixelrec_record("z", arr)})
    store = open_image_store(tmp_path / "k.lmdb")
    assert store.ids() == ["good"]
    assert set(store.refused) == {"n1\nn2", "[PAD]", "bad\\xff"}
    assert "U+000A" in store.refused["n1\nn2"] and "reserved" in store.refused["[PAD]"]
    assert "not UTF-8" in store.refused["bad\\xff"]
    with pytest.raises(ImageLoadError, match="reserved"):
        store.load("[PAD]")
