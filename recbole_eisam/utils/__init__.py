from recbole_eisam.utils.longtail import head_item_mask, item_counts, num_head_items

__all__ = ["head_item_mask", "item_counts", "num_head_items"]
