"""vlmeff.connectors: one module per model family; importing this package registers them."""

from vlmeff.connector import Connector, ImageSlot, VisionProbe
from vlmeff.connectors.llava import LlavaConnector
from vlmeff.connectors.llava_next import LlavaNextConnector
from vlmeff.connectors.qwen2_vl import Qwen2VLConnector, Qwen2VLImageOnlyProcessor

__all__ = ["Connector", "ImageSlot", "LlavaConnector", "LlavaNextConnector", "Qwen2VLConnector",
           "Qwen2VLImageOnlyProcessor", "VisionProbe"]
