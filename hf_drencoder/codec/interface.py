"""What a codec that uses no private data shares with `GradientCodec`: the byte count, an empty stage-1 cost, the
layout check and the message round trip."""

from __future__ import annotations

from .codec import GradientCodec


class PublicCodecMixin:
    """For codecs built from public settings and released messages only (the baselines, `SubspaceCodec`)."""

    @property
    def payload_bytes(self) -> int:
        """Bytes of one message as it leaves a party: every fp32 value (or int32 index) sent, the head included."""
        return 4 * self.latent_dim

    @property
    def stage1_history(self) -> list:
        """No stage 1: nothing to add to the privacy ledger."""
        return []

    check_layout = GradientCodec.check_layout
    _to_flat = GradientCodec._to_flat
    roundtrip = GradientCodec.roundtrip


__all__ = ["PublicCodecMixin"]
