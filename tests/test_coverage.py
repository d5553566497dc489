"""The kept-region diagnostic: grid cells of object boxes."""

from types import SimpleNamespace

from vlmeff.eval.coverage import object_cells


def test_object_cells_of_boxes():
    obj = SimpleNamespace(present=True, bbox=(14, 0, 29, 14))  # x 14..28 (cells 1, 2), y 0..13 (row 0)
    hidden = SimpleNamespace(present=False, bbox=(0, 0, 224, 224))
    scene = SimpleNamespace(objects=[obj, hidden])
    assert object_cells(scene, grid=16, image_size=224) == [{1, 2}]
    edge = SimpleNamespace(present=True, bbox=(210, 210, 224, 224))
    assert object_cells(SimpleNamespace(objects=[edge]), grid=16, image_size=224) == [{255}]
