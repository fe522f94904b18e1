//! The API listener's connections, each with a [`Connection`] handle its
//! requests can reach (as `ConnectInfo`) to give up on the peer.
//!
//! A streaming response cannot end by itself once its client stops
//! reading: hyper polls a body only while the socket takes bytes, so a body
//! that has decided to stop is never asked for its end. A handler that cut
//! such a client off calls [`Connection::drop_if_stalled`]; the next write
//! the peer does not take then fails, and hyper drops the connection.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use futures::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

#[derive(Default)]
struct Shared {
    give_up: AtomicBool,
    /// The connection's task, as last seen waiting for the socket.
    writer: AtomicWaker,
}

/// A listener whose connections carry a [`Connection`] handle.
pub struct Droppable<L>(pub L);

impl<L: Listener> Listener for Droppable<L> {
    type Io = Io<L::Io>;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (inner, addr) = self.0.accept().await;
        let io = Io {
            inner,
            shared: Arc::default(),
        };
        (io, addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// A connection's socket; writes fail once its handle gave up on the peer
/// and the peer does not take bytes.
pub struct Io<T> {
    inner: T,
    shared: Arc<Shared>,
}

impl<T> Io<T> {
    /// The socket takes no bytes now: fail if the peer was given up on,
    /// else wait (and be woken if it is given up on meanwhile).
    fn stalled<R>(&self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        // Registered before the flag is read, so a give-up in between
        // still wakes this task.
        self.shared.writer.register(cx.waker());
        if self.shared.give_up.load(Ordering::Acquire) {
            Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the peer stopped reading and was given up on",
            )))
        } else {
            Poll::Pending
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Io<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Io<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Pending => self.stalled(cx),
            ready => ready,
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write_vectored(cx, bufs) {
            Poll::Pending => self.stalled(cx),
            ready => ready,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Pending => self.stalled(cx),
            ready => ready,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A request's handle on its connection.
#[derive(Clone)]
pub struct Connection(Arc<Shared>);

impl Connection {
    /// Drops the connection at the next write its peer does not take (at
    /// once if one is waiting now). Only for a response that closes its
    /// connection when it ends (`Connection: close`), so the request is the
    /// connection's last one.
    pub fn drop_if_stalled(&self) {
        self.0.give_up.store(true, Ordering::Release);
        self.0.writer.wake();
    }
}

impl<L: Listener> Connected<IncomingStream<'_, Droppable<L>>> for Connection {
    fn connect_info(stream: IncomingStream<'_, Droppable<L>>) -> Self {
        Connection(stream.io().shared.clone())
    }
}
