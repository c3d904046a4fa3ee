//! The web tier's tests, one binary: route tests through Rocket's local client,
//! browser tests in headless Chromium over WebDriver. Both run against a real
//! nats-server; answers come from a test inference responder (a k-nearest-
//! neighbours classifier over real MNIST) subscribed to `mnist.predict` in queue
//! group `inference`, since these tests are about the page, not the model.

mod browser;
mod common;
mod events;
mod lockout;
mod routes;
