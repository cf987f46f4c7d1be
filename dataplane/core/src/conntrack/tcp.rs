//! The TCP state machine of a tracked flow, after Linux nf_conntrack's, simplified to what a
//! middlebox observes from flags (no window tracking):
//!
//! ```text
//! SYN_SENT --SYN|ACK (reply)--> SYN_RECV --ACK (orig)--> ESTABLISHED
//! ESTABLISHED --FIN (orig)--> FIN_WAIT --FIN (reply)--> LAST_ACK --ACK--> TIME_WAIT
//! ESTABLISHED --FIN (reply)--> CLOSE_WAIT --FIN (orig)--> LAST_ACK
//! any --RST--> CLOSE
//! ```

use super::Dir;
use crate::wire::TcpFlags;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TcpState {
    SynSent,
    SynRecv,
    Established,
    FinWait,
    CloseWait,
    LastAck,
    TimeWait,
    Close,
}

/// Something worth telling the operator about, seen while tracking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpEvent {
    None,
    /// The backend answered a SYN with a bare ACK instead of SYN|ACK: it still holds this
    /// 5-tuple (TIME_WAIT), the signature of incident 2.
    BareAckToSyn,
    /// A new SYN on a flow in TIME_WAIT or CLOSE: the caller should start a new flow.
    Reopened,
    /// The handshake completed.
    Established,
    /// The client sent its SYN again: no SYN|ACK yet (incidents 1, 3, 4: a backend that does
    /// not answer).
    SynRetransmit,
    /// The backend answered the SYN with SYN|ACK.
    SynAnswered,
}

impl TcpState {
    pub fn name(&self) -> &'static str {
        match self {
            TcpState::SynSent => "SYN_SENT",
            TcpState::SynRecv => "SYN_RECV",
            TcpState::Established => "ESTABLISHED",
            TcpState::FinWait => "FIN_WAIT",
            TcpState::CloseWait => "CLOSE_WAIT",
            TcpState::LastAck => "LAST_ACK",
            TcpState::TimeWait => "TIME_WAIT",
            TcpState::Close => "CLOSE",
        }
    }

    /// The state after a packet with `flags` in direction `dir`.
    pub fn next(self, dir: Dir, flags: TcpFlags) -> (TcpState, TcpEvent) {
        use TcpState::*;
        let syn = flags.contains(TcpFlags::SYN);
        let ack = flags.contains(TcpFlags::ACK);
        let fin = flags.contains(TcpFlags::FIN);
        if flags.contains(TcpFlags::RST) {
            return (Close, TcpEvent::None);
        }
        match (self, dir) {
            (SynSent, Dir::Reply) if syn && ack => (SynRecv, TcpEvent::SynAnswered),
            (SynSent, Dir::Reply) if ack && !syn => (SynSent, TcpEvent::BareAckToSyn),
            (SynSent, Dir::Orig) if syn && !ack => (SynSent, TcpEvent::SynRetransmit),
            (SynSent, _) => (SynSent, TcpEvent::None),
            (SynRecv, Dir::Orig) if ack && !syn => (Established, TcpEvent::Established),
            (SynRecv, _) => (SynRecv, TcpEvent::None),
            (Established, Dir::Orig) if fin => (FinWait, TcpEvent::None),
            (Established, Dir::Reply) if fin => (CloseWait, TcpEvent::None),
            (FinWait, Dir::Reply) if fin => (LastAck, TcpEvent::None),
            (CloseWait, Dir::Orig) if fin => (LastAck, TcpEvent::None),
            (LastAck, _) if ack && !fin => (TimeWait, TcpEvent::None),
            (TimeWait | Close, Dir::Orig) if syn && !ack => (SynSent, TcpEvent::Reopened),
            (s, _) => (s, TcpEvent::None),
        }
    }
}
