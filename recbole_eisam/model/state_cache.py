"""The frozen LLM's state of each history prompt, computed once and kept on disk.

With ``llm_frozen: True`` LLMRec's user state depends only on the prompt, and the prompt only
on the user's last ``max_history_items`` items (the *window*). :class:`PromptStateCache`
maps each window to the frozen model's pooled state: the training windows are encoded when
the model is built (timed and logged; a long build writes what it has every 10 minutes, so
a stopped one resumes), any other window (validation, test) the first time it is asked for;
everything is written to ``<llm_cache_dir>/prompt_states_<key>.safetensors``,
whose key covers everything the states depend on (model file, depth, dtype, dataset, prompt
templates, pooling), so a later run reads them instead of running the LLM.
"""

import os
import time

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from recbole_eisam.model.item_text import cache_key


class PromptStateCache:
    """Window -> state, in memory and on disk.

    Args:
        folder (str): where the cache file lives.
        key_parts (dict): everything the states depend on (hashed into the file name).
        encode (callable): ``encode(windows LongTensor[B, W]) -> FloatTensor[B, H]``, the frozen
            model's states of a batch of windows.
        batch_size (int): windows per batch when encoding.
        logger: where the build time and size are reported.
    """

    #: a long build writes what it has at least this often, so that a stopped build loses little
    FLUSH_SECONDS = 600

    def __init__(self, folder, key_parts, encode, batch_size=128, logger=None, show_progress=False):
        self.path = os.path.join(folder, f"prompt_states_{cache_key(key_parts)}.safetensors")
        self.encode, self.batch_size = encode, int(batch_size)
        self.logger, self.show_progress = logger, show_progress
        self.index, self.windows, self.states = {}, [], []
        self._stacked = None  # the states as one tensor, rebuilt after additions
        self.saved = 0  # entries already on disk
        if os.path.isfile(self.path):
            try:
                data = load_file(self.path)
                self._add(data["windows"], data["states"])
                self.saved = len(self.index)
                self._log(f"{self.saved} prompt states read from the cache {self.path}")
            except Exception as err:  # a truncated file: rebuild
                self._log(f"unreadable prompt-state cache {self.path} ({err}); rebuilding", warning=True)
                self.index, self.windows, self.states = {}, [], []

    def __len__(self):
        return len(self.index)

    def _log(self, message, warning=False):
        if self.logger is not None:
            (self.logger.warning if warning else self.logger.info)(f"LLMRec: {message}")

    @staticmethod
    def _keys(windows):
        rows = np.ascontiguousarray(windows.cpu().numpy().astype(np.int64))
        return [row.tobytes() for row in rows]

    def _add(self, windows, states):
        for key in self._keys(windows):
            if key not in self.index:
                self.index[key] = len(self.index)
        self.windows.append(windows.cpu().long())
        self.states.append(states.detach().float().cpu())
        self._stacked = None

    def _missing(self, windows):
        """The distinct windows of ``windows`` that have no state yet, ``[n, W]``."""
        seen, rows = set(), []
        for i, key in enumerate(self._keys(windows)):
            if key not in self.index and key not in seen:
                seen.add(key)
                rows.append(i)
        return windows[rows] if rows else None

    @torch.no_grad()
    def build(self, windows, what="training"):
        """Encode every window of ``windows`` that has no state yet; logs the time and the size."""
        missing = self._missing(windows.cpu())
        if missing is None:
            return
        start = time.time()
        lengths = (missing > 0).sum(dim=1)
        order = torch.argsort(lengths, descending=True)  # similar lengths together: less padding
        starts = range(0, missing.size(0), self.batch_size)
        quiet = what == "new"  # a scoring batch's new windows: say it once, at the write (flush)
        if self.show_progress and not quiet:
            starts = tqdm(starts, desc=f"Encoding {what} prompts", total=len(starts))
        last_write = time.time()
        for s in starts:
            batch = missing[order[s : s + self.batch_size]]
            self._add(batch, self.encode(batch))
            if not quiet and time.time() - last_write > self.FLUSH_SECONDS:  # a stopped build resumes from here
                self.flush()
                last_write = time.time()
        seconds = time.time() - start
        if quiet:
            return
        self._log(
            f"{missing.size(0)} {what} prompt states encoded by the frozen LLM in {seconds:.1f} s "
            f"({missing.size(0) / max(seconds, 1e-9):.1f} prompts/s); the cache holds {len(self)} "
            f"states, {self.nbytes() / 2**20:.1f} MiB"
        )

    def nbytes(self):
        return sum(s.numel() * s.element_size() for s in self.states)

    def lookup(self, windows):
        """The states of ``windows`` ``[B, W]`` (encoding the ones not seen yet), on their device."""
        self.build(windows, what="new")
        if self._stacked is None:
            self.windows, self.states = [torch.cat(self.windows)], [torch.cat(self.states)]
            self._stacked = self.states[0]
        rows = torch.as_tensor([self.index[key] for key in self._keys(windows)])
        return self._stacked[rows].to(windows.device)

    def flush(self):
        """Write the cache (atomically) when it holds states that are not on disk yet."""
        if len(self) == self.saved:
            return
        folder = os.path.dirname(self.path)
        os.makedirs(folder, exist_ok=True)
        tmp = f"{self.path}.{os.getpid()}.tmp"
        windows, states = torch.cat(self.windows).contiguous(), torch.cat(self.states).contiguous()
        save_file({"windows": windows, "states": states}, tmp)
        os.replace(tmp, self.path)
        self.saved = len(self)
        size = os.path.getsize(self.path) / 2**20
        self._log(f"{self.saved} prompt states written to the cache {self.path} ({size:.1f} MiB)")
