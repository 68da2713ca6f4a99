//! chorus-server library
