//! The pure, synchronous algorithms the actors wrap: decoding, embedding,
//! photo quality, clustering and the hero score. Each is unit-tested here.

pub mod budget;
pub mod capture;
pub mod cluster;
pub mod dbscan;
pub mod decode;
pub mod embed;
pub mod hero;
pub mod identity;
pub mod neighbours;
pub mod photo;
pub mod prepared;
pub mod quality;
pub mod resize;
