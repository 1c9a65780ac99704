pub mod ganesha;
