from recbole_eisam.utils.longtail import head_item_mask, item_counts

__all__ = ["head_item_mask", "item_counts"]
